"""Decode captured in CUDA graphs, one per batch-size bucket; replays pad the batch with row 0 / slot 0."""

from __future__ import annotations

import bisect
import logging

import torch

from serving.forward_batch import ForwardBatch, ForwardMode

logger = logging.getLogger(__name__)


def batch_buckets(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256]
    return [s for s in sizes if s < max_bs] + [max_bs]


class CudaGraphRunner:
    def __init__(self, runner, max_bs: int):
        self.runner = runner
        self.model = runner.model
        self.buckets = batch_buckets(max_bs)
        self.max_bs = max_bs
        dev = runner.device
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.out_cache_loc = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.req_pool_indices = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple] = {}
        self.aux_layer_ids = runner.aux_layer_ids
        self.pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for bs in reversed(self.buckets):
                self._capture(bs)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def _batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            aux_layer_ids=self.aux_layer_ids,
            attn_backend=self.runner.backend,
        )

    def _run(self, fb: ForwardBatch):
        hidden, aux = self.model(fb)
        return self.model.compute_logits(hidden), hidden, aux

    def _capture(self, bs: int) -> None:
        fb = self._batch(bs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile/autotune outside capture
                self._run(fb)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._run(fb)
        self.graphs[bs] = graph
        self.outputs[bs] = out

    def can_run(self, fb: ForwardBatch) -> bool:
        return fb.batch_size <= self.max_bs and tuple(fb.aux_layer_ids) in ((), tuple(self.aux_layer_ids))

    def replay(self, fb: ForwardBatch):
        n = fb.batch_size
        bs = self.buckets[bisect.bisect_left(self.buckets, n)]
        if bs != n:
            self.input_ids[n:bs].zero_()
            self.positions[n:bs].zero_()
            self.out_cache_loc[n:bs].zero_()
            self.req_pool_indices[n:bs].zero_()
            self.seq_lens[n:bs].fill_(1)
        self.input_ids[:n].copy_(fb.input_ids)
        self.positions[:n].copy_(fb.positions)
        self.out_cache_loc[:n].copy_(fb.out_cache_loc)
        self.req_pool_indices[:n].copy_(fb.req_pool_indices)
        self.seq_lens[:n].copy_(fb.seq_lens)
        self.graphs[bs].replay()
        logits, hidden, aux = self.outputs[bs]
        return logits[:n], hidden[:n], (aux[:n] if aux is not None and fb.aux_layer_ids else None)
