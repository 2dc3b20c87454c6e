"""CUDA graphs of the decode step, of K greedy decode steps in a row, and of the speculative verify forward, one per
batch-size bucket; replays pad the batch with row 0 / slot 0 (both reserved for padding)."""

from __future__ import annotations

import bisect
import contextlib
import gc
import logging

import torch

from serving.forward_batch import ForwardBatch, ForwardMode

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def no_gc():
    """No garbage collection while capturing: collecting another CUDA graph (an old engine's) mid-capture
    resets it, which CUDA forbids during a capture and which invalidates the capture."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# Captures so far in this process: an engine iteration that captured (and compiled) is no sample of its speed.
captures = 0


def capture_graph(fn, pool):
    """(graph, fn's outputs): fn run twice on a side stream (Triton compiles, allocations settle), then captured."""
    global captures
    captures += 1
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with no_gc(), torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


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
        self.graphs[bs], self.outputs[bs] = capture_graph(lambda: self._run(fb), self.pool)

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


class GreedyStepsGraphRunner:
    """K greedy decode steps in one CUDA graph per batch-size bucket, captured at start-up like the single-step
    graphs (a capture inside a timed run or a request's latency would cost far more than it saves): the host copies
    the inputs of all K steps once and reads K tokens per request back, with nothing to do in between. Padded
    requests use row 0 and slot 0 (reserved scratch). capture=False runs the same buffers eagerly (CPU tests)."""

    def __init__(self, runner, max_bs: int, steps: int, capture: bool = True):
        self.runner = runner
        self.buckets = batch_buckets(max_bs)
        self.max_bs = max_bs
        self.steps = steps
        dev = runner.device
        self.rows = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.pos0 = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.grid = torch.zeros(steps, max_bs, dtype=torch.int64, device=dev)  # step-major: contiguous per step
        self.aux_layer_ids = tuple(runner.aux_layer_ids)
        self.capture = capture
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.failed = False
        if capture:
            # Its own pool: the outputs stay valid while the single-step graphs replay.
            self.pool = torch.cuda.graph_pool_handle()
            try:
                with torch.inference_mode():
                    for bs in reversed(self.buckets):
                        self.graphs[bs], self.outputs[bs] = capture_graph(self._fn(bs), self.pool)
            except Exception:  # keep serving with single-step graphs
                self.failed = True
                logger.exception("capturing %d greedy decode steps failed; decoding one step per graph", steps)
            else:
                logger.info("captured %d-step greedy decode CUDA graphs for batch sizes %s", steps, self.buckets)

    def can_run(self, batch_size: int, steps: int, capture_aux: bool) -> bool:
        """The graph stores aux states exactly when the engine speculates (it has aux layers)."""
        return (
            not self.failed and steps == self.steps and batch_size <= self.max_bs
            and capture_aux == bool(self.aux_layer_ids)
        )  # fmt: skip

    def _fn(self, bs: int):
        return lambda: self.runner.greedy_steps(
            self.rows[:bs], self.pos0[:bs], self.grid[:, :bs], self.ids[:bs], self.aux_layer_ids, None
        )

    def run(self, rows, pos0, grid, input_ids) -> torch.Tensor:
        """rows, pos0, input_ids [B]; grid [K, B] -> [B, K] tokens."""
        n = rows.shape[0]
        bs = self.buckets[bisect.bisect_left(self.buckets, n)]
        if bs != n:
            for buf in (self.rows, self.pos0, self.ids):
                buf[n:bs].zero_()
            self.grid[:, n:bs].zero_()
        self.rows[:n].copy_(rows)
        self.pos0[:n].copy_(pos0)
        self.ids[:n].copy_(input_ids)
        self.grid[:, :n].copy_(grid)
        if not self.capture:
            return self._fn(bs)()[:n]
        self.graphs[bs].replay()
        return self.outputs[bs][:n]


class VerifyGraphRunner:
    """The target's verify forward (num_tokens tree nodes per request under the tree mask, with aux states and
    logits) on fixed-size buffers, captured in a CUDA graph per batch-size bucket.

    Padded requests own no tokens (extend length 0, prefix 0, row 0) and write their K/V to slot 0. With
    capture=False the same buffers run eagerly: that is how the CPU tests check the buffer handling."""

    def __init__(self, runner, num_tokens: int, max_bs: int, capture: bool = True):
        self.runner = runner
        self.model = runner.model
        self.n = num_tokens
        self.buckets = batch_buckets(max_bs)
        self.max_bs = max_bs
        dev = runner.device
        total = max_bs * num_tokens
        self.input_ids = torch.zeros(total, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(total, dtype=torch.int64, device=dev)
        self.out_cache_loc = torch.zeros(total, dtype=torch.int64, device=dev)
        self.req_pool_indices = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.prefix_lens = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.extend_lens = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.start_loc = torch.arange(max_bs, dtype=torch.int64, device=dev) * num_tokens
        self.custom_mask = torch.zeros(max_bs, num_tokens, num_tokens, dtype=torch.bool, device=dev)
        self.aux_layer_ids = tuple(runner.aux_layer_ids)
        self.capture = capture
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple] = {}
        if capture:
            self.pool = torch.cuda.graph_pool_handle()
            with torch.inference_mode():
                for bs in reversed(self.buckets):
                    self._capture(bs)
            logger.info("captured verify CUDA graphs (%d tokens) for batch sizes %s", num_tokens, self.buckets)

    def _batch(self, bs: int) -> ForwardBatch:
        t = bs * self.n
        return ForwardBatch(
            mode=ForwardMode.TARGET_VERIFY,
            input_ids=self.input_ids[:t],
            positions=self.positions[:t],
            out_cache_loc=self.out_cache_loc[:t],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            extend_prefix_lens=self.prefix_lens[:bs],
            extend_seq_lens=self.extend_lens[:bs],
            extend_start_loc=self.start_loc[:bs],
            max_extend_len=self.n,
            custom_mask=self.custom_mask[:bs],
            aux_layer_ids=self.aux_layer_ids,
            attn_backend=self.runner.backend,
        )

    def _run(self, fb: ForwardBatch):
        hidden, aux = self.model(fb)
        return self.model.compute_logits(hidden), aux

    def _capture(self, bs: int) -> None:
        fb = self._batch(bs)
        self.graphs[bs], self.outputs[bs] = capture_graph(lambda: self._run(fb), self.pool)

    def can_run(self, batch_size: int) -> bool:
        return batch_size <= self.max_bs

    def run(self, rows, prefix_lens, input_ids, positions, out_cache_loc, custom_mask):
        """rows, prefix_lens [B]; input_ids, positions, out_cache_loc [B*N]; custom_mask [B, N, N] ->
        (logits [B*N, V] fp32, aux [B*N, 3H])."""
        b, n = rows.shape[0], self.n
        bs = self.buckets[bisect.bisect_left(self.buckets, b)]
        if bs != b:
            for buf in (self.req_pool_indices, self.prefix_lens, self.extend_lens, self.seq_lens):
                buf[b:bs].zero_()
            for buf in (self.input_ids, self.positions, self.out_cache_loc):
                buf[b * n : bs * n].zero_()
        self.req_pool_indices[:b].copy_(rows)
        self.prefix_lens[:b].copy_(prefix_lens)
        self.extend_lens[:b].fill_(n)
        torch.add(self.prefix_lens[:b], n, out=self.seq_lens[:b])
        self.input_ids[: b * n].copy_(input_ids)
        self.positions[: b * n].copy_(positions)
        self.out_cache_loc[: b * n].copy_(out_cache_loc)
        self.custom_mask[:b].copy_(custom_mask)
        if self.capture:
            self.graphs[bs].replay()
            logits, aux = self.outputs[bs]
        else:
            logits, aux = self._run(self._batch(bs))
        return logits[: b * n], aux[: b * n]
