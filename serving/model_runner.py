"""Owns the target model, its KV pool, the request-to-token table and the attention backend; turns lists of
requests into ForwardBatches and runs them."""

from __future__ import annotations

import logging

import torch

from serving.attention import create_backend
from serving.config import EngineConfig
from serving.forward_batch import ForwardBatch, ForwardMode
from serving.memory import KVPool, ReqToTokenPool, SlotAllocator
from serving.models.loader import LoadedTarget
from serving.request import Req

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, cfg: EngineConfig, target: LoadedTarget, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.model = target.model
        self.model.fused_kernels = device.type == "cuda"
        mc = self.model.config
        # Up to this width a decode step's linears are small enough that launches, not weight reads, bound them.
        self.model.fused_gemv = self.model.fused_kernels and not cfg.disable_fused_gemv and mc.hidden_size <= 2048
        self.model_config = mc
        self.dtype = self.model.embed_tokens.weight.dtype
        self.context_length = min(cfg.context_length or mc.max_position_embeddings, mc.max_position_embeddings)
        num_slots = self._kv_slots(mc)
        # A single request must always fit: the context never exceeds the pool.
        self.context_length = min(self.context_length, num_slots - 2)
        self.kv = KVPool(mc.num_layers, num_slots, mc.num_kv_heads, mc.head_dim, self.dtype, device)
        self.allocator = SlotAllocator(num_slots)
        self.req_to_token = ReqToTokenPool(cfg.max_running_requests * 2 + 8, self.context_length + 64, device)
        self.backend = create_backend(
            cfg.attention_backend,
            self.kv.k,
            self.kv.v,
            self.req_to_token.table,
            mc.head_dim**-0.5,
            precise_pv=cfg.attention_precise_pv,
        )
        self.aux_layer_ids: tuple[int, ...] = ()  # set by the speculative worker
        self.graph_runner = None
        self.verify_num_tokens: int | None = None  # set by the speculative worker: tree nodes per verify
        self.verify_max_bs = 0
        self.verify_graph = None
        self.aux_pool: torch.Tensor | None = None  # set by the speculative worker: aux states by KV slot
        self.steps_graph = None
        logger.info("KV pool: %d slots (%s), context %d", num_slots - 1, self.dtype, self.context_length)

    def _kv_slots(self, mc) -> int:
        if self.cfg.max_total_tokens:
            return self.cfg.max_total_tokens + 1
        per_slot = KVPool.bytes_per_slot(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype)
        if self.cfg.speculative:  # the draft's one-layer KV and the stored aux states share the budget, by slot
            elt = torch.empty((), dtype=self.dtype).element_size()
            per_slot += KVPool.bytes_per_slot(1, mc.num_kv_heads, mc.head_dim, self.dtype) + 3 * mc.hidden_size * elt
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * self.cfg.mem_fraction_static
        else:
            budget = self.cfg.kv_cache_memory_gb * 2**30
        return max(int(budget // per_slot), self.context_length + 16) + 1

    # --- batch construction -------------------------------------------------------------------------------------

    def _tensor(self, values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def build_extend(
        self,
        reqs: list[Req],
        new_slots: list[torch.Tensor],
        mode=ForwardMode.EXTEND,
        tokens: list[list[int]] | None = None,
        capture_aux=False,
        starts: list[int] | None = None,
        attn_backend=None,
    ) -> ForwardBatch:
        """Each req extends from its kv_len (or starts[i], whose slots are already in req_to_token) by
        len(new_slots[i]) tokens, taken from all_ids unless given."""
        ids, pos, prefix, ext = [], [], [], []
        for i, (req, slots) in enumerate(zip(reqs, new_slots)):
            start, n = (req.kv_len if starts is None else starts[i]), slots.numel()
            toks = tokens[i] if tokens is not None else req.all_ids[start : start + n]
            ids.extend(toks)
            pos.extend(range(start, start + n))
            prefix.append(start)
            ext.append(n)
            if starts is None:
                self.req_to_token.write(req.row, start, slots)
        loc = torch.cat(new_slots).to(self.device, non_blocking=True)
        seq = [p + e for p, e in zip(prefix, ext)]
        starts = [0]
        for e in ext[:-1]:
            starts.append(starts[-1] + e)
        return ForwardBatch(
            mode=mode,
            input_ids=self._tensor(ids),
            positions=self._tensor(pos),
            out_cache_loc=loc,
            req_pool_indices=self._tensor([r.row for r in reqs]),
            seq_lens=self._tensor(seq),
            extend_prefix_lens=self._tensor(prefix),
            extend_seq_lens=self._tensor(ext),
            extend_start_loc=self._tensor(starts),
            extend_seq_lens_cpu=ext,
            extend_prefix_lens_cpu=prefix,
            max_extend_len=max(ext),
            seq_lens_cpu=seq,
            max_seq_len=max(seq),
            aux_layer_ids=self.aux_layer_ids if capture_aux else (),
            attn_backend=attn_backend or self.backend,
        )

    def build_decode(
        self, reqs: list[Req], new_slots: torch.Tensor, capture_aux=False, input_ids: torch.Tensor | None = None,
        offset: int = 0, rows: torch.Tensor | None = None, positions: torch.Tensor | None = None,
    ) -> ForwardBatch:
        """One decode step: each request's next token at position kv_len + offset into new_slots [B] (device or
        host). input_ids (device) replaces the requests' last tokens, for steps whose inputs are still on the
        device; rows / positions (device) can be passed in to skip rebuilding them."""
        pos = [r.kv_len + offset for r in reqs]
        rows_t = rows if rows is not None else self._tensor([r.row for r in reqs])
        pos_t = positions if positions is not None else self._tensor(pos)
        loc = new_slots.to(self.device, non_blocking=True)
        self.req_to_token.table[rows_t, pos_t] = loc.to(torch.int32)
        seq = [p + 1 for p in pos]
        if input_ids is None:
            input_ids = self._tensor([r.last_token for r in reqs])
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=input_ids,
            positions=pos_t,
            out_cache_loc=loc,
            req_pool_indices=rows_t,
            seq_lens=pos_t + 1,
            seq_lens_cpu=seq,
            max_seq_len=max(seq),
            aux_layer_ids=self.aux_layer_ids if capture_aux else (),
            attn_backend=self.backend,
        )

    @torch.inference_mode()
    def forward(self, fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eager forward: (final hidden [N, H], aux hidden [N, 3H] or None)."""
        self.backend.init_forward_metadata(fb)
        return self.model(fb)

    @torch.inference_mode()
    def decode(self, fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Decode step (CUDA graph when captured): (logits [B, V] fp32, hidden [B, H], aux or None)."""
        if self.graph_runner is not None and self.graph_runner.can_run(fb):
            return self.graph_runner.replay(fb)
        hidden, aux = self.forward(fb)
        return self.model.compute_logits(hidden), hidden, aux

    @torch.inference_mode()
    def decode_greedy_steps(
        self, rows: torch.Tensor, pos0: torch.Tensor, grid: torch.Tensor, input_ids: torch.Tensor, max_len: int,
        capture_aux: bool = False,
    ) -> torch.Tensor:
        """K greedy decode steps back to back, all on the device: rows, pos0 (kv_len), input_ids [B], grid [K, B]
        KV slots (step-major) -> [B, K] tokens. Each step's argmax is the next step's input; with capture_aux the
        target's aux states go to aux_pool by slot. One CUDA graph for all K steps when captured (no host work
        between steps); max_len (the longest kv_len) is for backends that need host metadata."""
        if self.steps_graph is not None:
            return self.steps_graph.run(rows, pos0, grid, input_ids)
        return self.greedy_steps(rows, pos0, grid, input_ids, self.aux_layer_ids if capture_aux else (), max_len)

    def can_decode_greedy_steps(self, batch_size: int, steps: int, capture_aux: bool) -> bool:
        """Whether decode_greedy_steps fits: always without decode graphs (the same eager forwards a step loop
        would run), with graphs when the K-step graph matches (else single-step graph replays are cheaper)."""
        if self.steps_graph is not None:
            return self.steps_graph.can_run(batch_size, steps, capture_aux)
        return self.graph_runner is None

    def greedy_steps(self, rows, pos0, grid, ids, aux_layer_ids, max_len: int | None) -> torch.Tensor:
        """The body of decode_greedy_steps on tensors only (graph-capturable when max_len is None)."""
        outs = []
        for k in range(grid.shape[0]):
            pos = pos0 + k
            loc = grid[k]
            self.req_to_token.table[rows, pos] = loc.to(torch.int32)
            fb = ForwardBatch(
                mode=ForwardMode.DECODE, input_ids=ids, positions=pos, out_cache_loc=loc, req_pool_indices=rows,
                seq_lens=pos + 1, max_seq_len=0 if max_len is None else max_len + k + 1,
                aux_layer_ids=aux_layer_ids, attn_backend=self.backend,
            )  # fmt: skip
            if max_len is not None:
                self.backend.init_forward_metadata(fb)
            hidden, aux = self.model(fb)
            if aux is not None and self.aux_pool is not None:
                self.aux_pool[loc] = aux
            ids = self.model.compute_logits(hidden).argmax(-1)
            outs.append(ids)
        return torch.stack(outs, dim=1)

    def init_cuda_graphs(self) -> None:
        if self.device.type != "cuda" or self.cfg.disable_cuda_graph:
            return
        from serving.cuda_graph_runner import CudaGraphRunner, GreedyStepsGraphRunner, VerifyGraphRunner

        max_bs = min(self.cfg.cuda_graph_max_bs, self.cfg.max_running_requests)
        self.graph_runner = CudaGraphRunner(self, max_bs)
        steps = self.cfg.num_continuous_decode_steps or 8
        if steps > 1:
            self.steps_graph = GreedyStepsGraphRunner(self, max_bs, steps)
        if self.verify_num_tokens and self.backend.graph_capturable:
            max_bs = min(self.cfg.cuda_graph_max_bs, self.cfg.max_running_requests, self.verify_max_bs)
            self.verify_graph = VerifyGraphRunner(self, self.verify_num_tokens, max_bs)

    @torch.inference_mode()
    def verify(self, reqs: list[Req], node_slots: torch.Tensor, candidates: torch.Tensor, positions: torch.Tensor,
               tree_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target forward over each request's N tree nodes (candidates / positions [B, N] on the device, node_slots
        [B, N], tree_mask [B, N, N]) -> (logits [B, N, V] fp32, aux [B*N, 3H]); in a CUDA graph when captured."""
        b, n = candidates.shape
        if self.verify_graph is not None and self.verify_graph.can_run(b):
            logits, aux = self.verify_graph.run(
                self._tensor([r.row for r in reqs]),
                self._tensor([r.kv_len for r in reqs]),
                candidates.reshape(-1),
                positions.reshape(-1),
                node_slots.reshape(-1).to(self.device, non_blocking=True),
                tree_mask,
            )
            return logits.view(b, n, -1), aux
        fb = self.build_extend(reqs, list(node_slots), mode=ForwardMode.TARGET_VERIFY, capture_aux=True,
                               tokens=[[0] * n for _ in reqs])
        fb.input_ids = candidates.reshape(-1)
        fb.positions = positions.reshape(-1)
        fb.custom_mask = tree_mask
        hidden, aux = self.forward(fb)
        return self.model.compute_logits(hidden).view(b, n, -1), aux
