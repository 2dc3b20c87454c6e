"""EAGLE-3 tree speculative decoding inside the engine.

Per decode iteration, for B decode-ready requests (seq: L tokens with KV, the last sampled token t_L pending):
  1. draft: grow a tree from the draft's last hidden state (num_steps deep, topk children per node, cumulative
     probability scores) and keep the best num_draft_tokens - 1 nodes; node 0 is t_L;
  2. verify: one target forward over the N nodes at positions L + depth under the tree mask;
  3. accept: the longest path the target agrees with (greedy) or tree rejection sampling (exact target
     distribution), plus one bonus token; rejected nodes' KV slots are freed;
  4. draft extend: the draft consumes the accepted positions with the target's aux hidden states.
The draft's KV pool is indexed by the same slots (and req_to_token rows) as the target's. Every slot that holds
target KV either has its draft KV computed (`draft_ready`) or the target's aux states stored (`aux_pool`), so the
prefix cache keeps every token. Iterations that decode without speculation (adaptive mode, large batches), and
prefills in adaptive mode, only store the aux states; the draft consumes them in one extend when speculation
resumes.
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kernels import speculative as tree_ops
from serving.attention import create_backend
from serving.attention.torch_backend import grouped_attention
from serving.forward_batch import ForwardMode
from serving.memory import KVPool
from serving.request import Req
from serving.sampling import processed_probs
from serving.speculative.tree import max_draft_tokens, organize, select_top_k
from specbundle.checkpoint import load_draft

logger = logging.getLogger(__name__)

# Tuned defaults when neither flags nor bundle metadata say otherwise: (num_steps, topk, num_draft_tokens).
DEFAULT_CPU = (3, 1, 4)
DEFAULT_GPU = (5, 4, 16)
# Adaptive mode: each mode is first measured for PROBE_LEN iterations, plain decoding first (one iteration is a
# noisy sample: a verify step commits 1 token or several). Then now and then PROBE_LEN iterations run the currently
# slower mode, to notice when it becomes faster. The gap between such probes doubles (from PROBE_EVERY, up to
# PROBE_MAX) while they confirm the choice, and is never shorter than what keeps the time a losing probe costs
# (against the faster mode's rate) under PROBE_SHARE of decoding time; a change of the faster mode resets it.
PROBE_LEN = 8
PROBE_EVERY = 16
PROBE_MAX = 1 << 14
PROBE_SHARE = 0.01
RATE_EMA = 0.1
FLIP_MARGIN = 0.05
# A speculative window (the first measurement or a probe) ends early when, after its first iteration (which also
# pays the draft's catch-up on tokens committed meanwhile), CUT_AFTER more commit tokens at under CUT_RATIO of plain
# decoding's rate: a clear loss needs no full window, which matters where speculation is several times slower.
CUT_AFTER = 2
CUT_RATIO = 0.5


def _bucket(batch_size: int) -> int:
    return 1 << (batch_size - 1).bit_length()


@dataclass
class _ModeRate:
    """One mode's iterations: how many, and smoothed tokens and seconds per iteration."""

    n: int = 0
    tokens: float = 0.0
    seconds: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        first = self.n == 0
        self.tokens = tokens if first else (1 - RATE_EMA) * self.tokens + RATE_EMA * tokens
        self.seconds = seconds if first else (1 - RATE_EMA) * self.seconds + RATE_EMA * seconds
        self.n += 1


@dataclass
class _Run:
    """The current run of one mode: raw sums, and its first iteration's share (a speculative run's first iteration
    also pays the draft's catch-up on the tokens committed meanwhile)."""

    n: int = 0
    tokens: float = 0.0
    seconds: float = 0.0
    first_tokens: float = 0.0
    first_seconds: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        if self.n == 0:
            self.first_tokens, self.first_seconds = tokens, seconds
        self.n += 1
        self.tokens += tokens
        self.seconds += seconds


@dataclass
class _BucketRates:
    """The adaptive policy's state for one batch-size bucket."""

    spec: _ModeRate = field(default_factory=_ModeRate)
    plain: _ModeRate = field(default_factory=_ModeRate)
    steps: int = 0
    winner: bool | None = None  # True: speculation is the faster mode
    spec_measured: bool = False  # the first speculative window is over (full or cut)
    interval: int = PROBE_EVERY
    next_probe: int = 0
    last_spec: bool = False
    run: _Run = field(default_factory=_Run)
    min_gap: int = 0  # iterations between probes that keep the last losing probe's cost within PROBE_SHARE


class EagleWorker:
    def __init__(self, engine):
        self.engine = engine
        cfg = engine.cfg
        runner = engine.runner
        self.runner = runner
        self.device = runner.device
        target = engine.target
        self.draft_path, meta = self._resolve(target, cfg)
        mc = runner.model_config
        self.draft = load_draft(
            self.draft_path,
            dtype=runner.dtype,
            device=self.device,
            target_hidden_size=mc.hidden_size,
            target_vocab_size=mc.vocab_size,
        )
        self.draft.requires_grad_(False)
        self.draft.rotary.cos_sin = self.draft.rotary.cos_sin.float()
        dc = self.draft.config
        runner.aux_layer_ids = tuple(dc.resolved_aux_layer_ids(mc.num_layers))
        steps, topk, ntok = self._spec_config(cfg, meta)
        if ntok > max_draft_tokens(steps, topk):
            raise ValueError(
                f"--speculative-num-draft-tokens {ntok} exceeds what {steps} steps of topk {topk} "
                f"can propose ({max_draft_tokens(steps, topk)})"
            )
        if topk == 1:
            ntok = min(ntok, steps + 1)
        self.num_steps, self.topk, self.num_draft_tokens = steps, topk, ntok
        runner.verify_num_tokens = ntok
        runner.verify_max_bs = cfg.speculative_max_batch_size
        self.draft_kv = KVPool(1, runner.kv.num_slots, dc.num_key_value_heads, dc.head_dim, runner.dtype, self.device)
        # The target's aux states of plain-decoded tokens, by KV slot, until the draft consumes them.
        self.aux_pool = torch.zeros(
            runner.kv.num_slots, len(runner.aux_layer_ids) * mc.hidden_size, dtype=runner.dtype, device=self.device
        )
        runner.aux_pool = self.aux_pool  # multi-step greedy decoding stores into it inside its graph
        # Host-side, by slot: whether the draft KV is computed; where not, the slot's aux states are in aux_pool.
        self.draft_ready = torch.zeros(runner.kv.num_slots, dtype=torch.bool)
        self.draft_backend = create_backend(
            "torch" if self.device.type == "cpu" else cfg.attention_backend,
            self.draft_kv.k,
            self.draft_kv.v,
            runner.req_to_token.table,
            dc.head_dim**-0.5,
            precise_pv=cfg.attention_precise_pv,
        )
        on_gpu = self.device.type == "cuda"
        self._build_tree = tree_ops.build_tree if on_gpu else tree_ops.build_tree_ref
        self._verify_greedy = tree_ops.verify_tree_greedy if on_gpu else tree_ops.verify_tree_greedy_ref
        self._verify_sampling = tree_ops.tree_speculative_sampling if on_gpu else tree_ops.tree_speculative_sampling_ref
        self.max_batch = cfg.speculative_max_batch_size
        self.draft_graphs = self.extend_graphs = None
        if self.device.type == "cuda" and not cfg.disable_cuda_graph:
            graph_bs = min(cfg.cuda_graph_max_bs, cfg.max_running_requests, cfg.speculative_max_batch_size)
            self.draft_graphs = _DraftTreeGraphs(self, graph_bs)
            self.extend_graphs = _DraftExtendGraphs(self, graph_bs)
        self.adaptive = not cfg.disable_speculative_adaptive
        # Adaptive mode decodes plainly until speculation has measured faster (and at batch sizes where it lost): the
        # draft's pass over a prompt waits for the request's first speculative iteration, which may never come.
        self.defer_prefill = self.adaptive
        self._rates: dict[int, _BucketRates] = {}
        self._joined = False  # a request finished its prefill since the last decode decision
        logger.info("EAGLE-3 draft %s: %s", self.draft_path, self.describe())

    def _resolve(self, target, cfg):
        from specbundle.bundle import BundleError, BundleMetadata, verify_bundle
        from specbundle.resolve import resolve_draft

        draft = cfg.speculative_draft_model_path
        if draft is not None and Path(draft).is_dir():
            path = Path(draft)
            verify_bundle(path)  # hashes when it carries bundle metadata; sizes are checked against the target below
        else:
            source = cfg.model if cfg.model is not None else target.target_id
            path = resolve_draft(str(source), draft)
        try:
            meta = BundleMetadata.from_file(path)
        except BundleError:
            meta = None  # a bare SpecForge/SGLang checkpoint folder has no bundle metadata
        return path, meta

    def _spec_config(self, cfg, meta):
        if meta is not None:
            default = (meta.speculative.num_steps, meta.speculative.eagle_topk, meta.speculative.num_draft_tokens)
        else:
            default = DEFAULT_GPU if self.device.type == "cuda" else DEFAULT_CPU
        steps = cfg.speculative_num_steps or default[0]
        topk = cfg.speculative_eagle_topk or default[1]
        ntok = cfg.speculative_num_draft_tokens or (steps + 1 if topk == 1 else default[2])
        return steps, topk, ntok

    def capture_graphs(self, batch_size: int, max_len: int) -> int:
        """Capture the draft's CUDA graphs for every batch bucket up to batch_size's and every prefix width up to
        max_len's now (they are otherwise captured on first use, each taking a fraction of a second inside a decode
        iteration); returns how many were captured. A no-op without CUDA graphs."""
        return sum(g.capture_up_to(batch_size, max_len) for g in (self.draft_graphs, self.extend_graphs) if g)

    def describe(self) -> str:
        return f"num_steps={self.num_steps} topk={self.topk} num_draft_tokens={self.num_draft_tokens}"

    # --- engine hooks -------------------------------------------------------------------------------------------

    @property
    def slots_per_step(self) -> int:
        return self.num_draft_tokens

    def should_speculate(self, batch_size: int) -> bool:
        """Speculate when it fits and, unless adaptivity is off, when it has measured faster than plain decoding
        at this batch size (both are lossless, so switching never changes the output)."""
        if batch_size > self.max_batch:
            return False
        limit = self.engine.context_length
        if not all(r.seq_len + self.num_draft_tokens <= limit for r in self.engine.running):
            return False
        if not self.adaptive:
            return True
        bucket = _bucket(batch_size)
        rates = self._rates.get(bucket)
        if rates is None or rates.plain.n < PROBE_LEN:
            return False  # plain decoding is measured first: it is the safe choice
        if rates.spec.n == 0 and any(r.winner is False for b, r in self._rates.items() if b < bucket):
            # Speculation pays less as the batch grows, so where it lost at a smaller batch, stay plain here; trying
            # it would cost a draft catch-up and graph captures.
            return False
        if not rates.spec_measured:
            return True
        joined, self._joined = self._joined, False
        if (
            joined
            and rates.winner is False
            and rates.steps >= rates.next_probe - rates.interval + rates.min_gap
            and not rates.next_probe <= rates.steps < rates.next_probe + PROBE_LEN
        ):
            # A new request brings new text, and acceptance depends on the text: probe speculation now rather than
            # at the end of the doubled gap, as long as probes stay within their time share.
            rates.next_probe = rates.steps
        probe = rates.next_probe <= rates.steps < rates.next_probe + PROBE_LEN
        return rates.winner != probe

    def record(self, speculative: bool, batch_size: int, tokens: int, seconds: float) -> None:
        """Tokens committed per second by each mode, per batch-size bucket: smoothed tokens over smoothed seconds
        per iteration (a ratio of averages: single verify steps commit 1 token or several)."""
        if seconds <= 0:
            return
        rates = self._rates.setdefault(_bucket(batch_size), _BucketRates())
        if not speculative:
            rates.plain.add(tokens, seconds)
        elif rates.last_spec:
            rates.spec.add(tokens, seconds)  # a window's first iteration also pays the draft's catch-up: not a rate
        rates.steps += 1
        if speculative != rates.last_spec:
            rates.run = _Run()
        run = rates.run
        run.add(tokens, seconds)
        cut = False
        if speculative:  # a speculative window is judged without its first iteration
            plain = rates.plain
            judged_tokens, judged_seconds = run.tokens - run.first_tokens, run.seconds - run.first_seconds
            cut = (
                run.n > CUT_AFTER
                and plain.n > 0
                and judged_tokens * plain.seconds < CUT_RATIO * plain.tokens * judged_seconds
            )
        rates.last_spec = speculative
        rates.spec_measured = rates.spec_measured or rates.spec.n >= PROBE_LEN or cut
        if not rates.spec_measured or rates.plain.n < PROBE_LEN:
            return
        # tokens per second of each mode, as ratios of the smoothed sums (cross-multiplied: no division); the
        # faster mode changes only when the other one leads by FLIP_MARGIN, so noise does not flip it back and forth
        spec_rate, plain_rate = rates.spec.tokens * rates.plain.seconds, rates.plain.tokens * rates.spec.seconds
        if rates.winner is None:
            winner = spec_rate >= plain_rate
        elif rates.winner:
            winner = plain_rate <= (1 + FLIP_MARGIN) * spec_rate
        else:
            winner = spec_rate > (1 + FLIP_MARGIN) * plain_rate
        if rates.winner is None or winner != rates.winner:
            rates.interval = PROBE_EVERY  # first comparison, or the faster mode changed: check again soon
            rates.next_probe = rates.steps + PROBE_EVERY
        elif speculative != winner and (cut or rates.steps >= rates.next_probe + PROBE_LEN):
            # A probe ran the other mode (whole, or cut short by a clear loss), and it still loses: probe half as
            # often, and at most so often that such probes cost PROBE_SHARE of the time.
            best = rates.spec if winner else rates.plain
            lost = run.seconds - run.tokens * best.seconds / max(best.tokens, 1e-9)
            budget = math.ceil(max(lost, 0.0) / (PROBE_SHARE * best.seconds))
            rates.interval = min(max(2 * rates.interval, budget), PROBE_MAX)
            rates.next_probe = rates.steps + rates.interval
            rates.min_gap = min(budget, PROBE_MAX)
        rates.winner = winner

    def on_release(self, req: Req) -> None:
        req.draft_state = {}

    # --- draft forward helpers ----------------------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.runner.model.embed_tokens(ids)

    def _draft_topk(self, prenorm: torch.Tensor):
        """prenorm [M, H] -> (topk probs [M, topk], topk target ids [M, topk])."""
        logits = self.draft.compute_logits(self.draft.norm(prenorm), self.runner.model.lm_head.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        p, idx = probs.topk(self.topk, dim=-1)
        return p, self.draft.draft_to_target(idx)

    def _draft_extend(
        self, reqs: list[Req], starts: list[int], tokens: list[list[int]], aux: torch.Tensor, slots: list[torch.Tensor]
    ) -> None:
        """Draft consumes positions starts[i] .. starts[i]+len(tokens[i])-1 with the target's aux states [M, 3H];
        token lists are the *next* tokens. Stores each request's last prenorm hidden and its top-k."""
        fb = self.runner.build_extend(
            reqs, slots, ForwardMode.DRAFT_EXTEND, tokens=tokens, starts=starts, attn_backend=self.draft_backend
        )
        self.draft_backend.init_forward_metadata(fb)
        _, prenorm = self.draft(
            self._embed(fb.input_ids),
            aux.to(self.runner.dtype),
            fb.positions,
            lambda q, k, v, ctx: self.draft_backend.forward(q, k, v, 0, ctx),
            fb,
        )
        ends = torch.tensor(fb.extend_seq_lens_cpu).cumsum(0) - 1
        last = ends.to(self.device)
        hidden = prenorm[last]  # [B, H]
        self._store_draft_state(reqs, hidden, *self._draft_topk(hidden), fb.seq_lens_cpu)

    @staticmethod
    def _store_draft_state(reqs: list[Req], hidden, topk_p, topk_index, draft_lens: list[int]) -> None:
        """Each request's last prenorm hidden and its top-k after a draft extend, and how far its draft KV reaches."""
        for i, req in enumerate(reqs):
            st = req.draft_state
            st["hidden"], st["topk_p"], st["topk_index"] = hidden[i], topk_p[i], topk_index[i]
            st["draft_len"] = int(draft_lens[i])

    def _draft_extend_tensors(self, ids, aux, positions, loc, rows, seq_lens, last, width: int):
        """`_draft_extend` on fixed shapes, no host sync (CUDA-graph capturable): B requests x E tokens, flattened;
        ids [B*E] the next tokens, aux [B*E, 3H], positions and KV slots loc [B*E] (padding: slot 0), rows [B],
        seq_lens [B] (draft KV length after the extend), last [B] (flat index of each request's last real token),
        width >= every seq_len -> (hidden [B, H], topk_p [B, topk], topk_index [B, topk])."""
        ctx = _ExtendDraftAttention(self, rows, seq_lens, positions, loc, width)
        _, prenorm = self.draft(self._embed(ids), aux, positions, ctx, None)
        hidden = prenorm[last]
        p, idx = self._draft_topk(hidden)
        return hidden, p, idx

    def after_prefill(self, fb, batch, new_slots, hidden, aux, done_reqs, tokens) -> None:
        """Store each prefilled chunk's aux states by slot, then (unless deferred) extend the draft over every
        position it lacks: the chunk, and cached prefix positions whose draft KV was never computed. The final
        chunk's last next-token is the one just sampled."""
        self._joined = self._joined or bool(done_reqs)
        for req in batch:
            if "draft_len" not in req.draft_state:  # first chunk: the cached prefix's draft KV reaches this far
                ready = self.draft_ready[req.slots[: req.num_prefix_slots]]
                req.draft_state["draft_len"] = int(ready.numel() if ready.all() else ready.int().argmin())
        slots = torch.cat(new_slots)
        self.store_aux(slots.to(self.device, non_blocking=True), aux)
        self.pending(slots)
        if not self.defer_prefill:
            sampled = {id(r): t for r, t in zip(done_reqs, tokens.tolist())} if tokens is not None else {}
            self._catch_up(batch, sampled)

    def store_aux(self, out_cache_loc: torch.Tensor, aux: torch.Tensor) -> None:
        """Plain decode steps only keep the target's aux states (by KV slot, on the device, no sync); the draft
        consumes them when speculation resumes (`_catch_up`), so plain decoding pays no draft forward."""
        self.aux_pool[out_cache_loc] = aux

    def pending(self, slots: torch.Tensor) -> None:
        """These slots (host tensor) now hold target KV whose aux states are stored and whose draft KV is not."""
        self.draft_ready[slots] = False

    def _catch_up(self, reqs: list[Req], sampled: dict[int, int] | None = None) -> None:
        """Draft-extend the positions whose aux states are stored (draft_len .. kv_len - 1). The next token of the
        last one is sampled[id(req)] where it is not committed yet (right after a prefill)."""
        starts, toks, slots = [], [], []
        for req in reqs:
            start = req.draft_state.get("draft_len", 0)
            nxt = req.all_ids[start + 1 : req.kv_len + 1]
            if len(nxt) < req.kv_len - start:
                nxt = nxt + [sampled[id(req)]]
            starts.append(start)
            toks.append(nxt)
            slots.append(req.slots[start : req.kv_len])
        flat = torch.cat(slots)
        aux = self.aux_pool[flat.to(self.device, non_blocking=True)]
        self._draft_extend(reqs, starts, toks, aux, slots)
        self.draft_ready[flat] = True

    # --- one speculative iteration ------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode_step(self, reqs: list[Req], slots: torch.Tensor) -> None:
        eng, runner, dev = self.engine, self.runner, self.device
        B, N, topk = len(reqs), self.num_draft_tokens, self.topk
        reqs = list(reqs)
        behind = [r for r in reqs if r.draft_state.get("draft_len", 0) < r.kv_len]
        if behind:
            self._catch_up(behind)
        seq_lens = torch.tensor([r.kv_len for r in reqs]).to(dev, non_blocking=True)
        parent_list, selected, draft_tokens = self._grow_tree(reqs, seq_lens)
        roots = torch.tensor([r.last_token for r in reqs]).to(dev, non_blocking=True)
        candidates = torch.cat([roots[:, None], draft_tokens], dim=1)  # [B, N]
        tree_mask, positions, r_index, r_next, r_sib = self._build_tree(
            parent_list, selected, seq_lens, topk, self.num_steps, N
        )

        # Target verify over all nodes (a CUDA graph per batch bucket when captured).
        node_slots = slots.view(B, N)
        logits, aux = runner.verify(reqs, node_slots, candidates, positions.to(dev), tree_mask)  # [B, N, V]

        params = [r.params for r in reqs]
        if all(p.greedy for p in params):
            predicts, accept_index, accept_len = self._verify_greedy(
                candidates, r_index, r_next, r_sib, logits.argmax(-1), self.num_steps + 1
            )
        else:
            predicts, accept_index, accept_len = self._sample_verify(reqs, logits, candidates, r_index, r_next, r_sib)

        accept_index = accept_index.cpu()
        accept_len = accept_len.cpu().tolist()
        predicts = predicts.cpu()
        new_tokens, ext_starts, ext_tokens, ext_slots, keep_rows = [], [], [], [], []
        slots_cpu = node_slots.cpu()
        for b, req in enumerate(reqs):
            n_acc = accept_len[b]
            path = accept_index[b, : n_acc + 1].long()  # flattened rows: root first
            local = path - b * N
            toks = predicts[path].tolist()  # committed after each path node: next accepted draft tokens + bonus
            start = req.kv_len
            kept = slots_cpu[b, local]
            runner.req_to_token.write(req.row, start, kept)
            req.slots = torch.cat([req.slots, kept])
            mask = torch.ones(N, dtype=torch.bool)
            mask[local] = False
            eng.allocator.free(slots_cpu[b][mask])
            new_tokens.append(toks)
            ext_starts.append(start)
            ext_tokens.append(toks)
            ext_slots.append(kept)
            keep_rows.append(path)
            if req.spec is not None:
                req.spec.num_verify_steps += 1
                req.spec.num_draft_tokens += N - 1
                req.spec.num_accepted_tokens += n_acc
        if eng.metrics is not None:
            eng.metrics.observe_spec_step(accept_len, N - 1, self.num_steps)
        if self.extend_graphs is not None and self.extend_graphs.can_run(B):
            self.extend_graphs.run(reqs, ext_starts, ext_tokens, ext_slots, keep_rows, aux)
        else:
            rows = torch.cat(keep_rows).to(dev)
            self._draft_extend(reqs, ext_starts, ext_tokens, aux[rows], ext_slots)
        self.draft_ready[torch.cat(ext_slots)] = True
        eng._commit(reqs, new_tokens)

    def _sample_verify(self, reqs, logits, candidates, r_index, r_next, r_sib):
        B, N, V = logits.shape
        probs = processed_probs(logits.view(B * N, V), [r.params for r in reqs for _ in range(N)]).view(B, N, V)
        coins = torch.empty(B, N, device=logits.device)
        final = torch.empty(B, device=logits.device)
        for b, req in enumerate(reqs):
            if req.params.seed is not None:
                g = torch.Generator(device="cpu")
                g.manual_seed((req.params.seed * 1_000_003 + len(req.output_ids)) & 0x7FFF_FFFF_FFFF_FFFF)
                u = torch.rand(N + 1, generator=g).to(logits.device)
            else:
                u = torch.rand(N + 1, device=logits.device)
            coins[b], final[b] = u[:N], u[N]
        return self._verify_sampling(
            candidates, r_index, r_next, r_sib, None, probs.float().contiguous(), coins, final, self.num_steps + 1
        )

    def _grow_tree(self, reqs: list[Req], seq_lens: torch.Tensor):
        """Draft steps with exact ancestor attention. Returns (parent_list, selected_index, draft_tokens)."""
        topk_p = torch.stack([r.draft_state["topk_p"] for r in reqs])  # [B, topk]
        topk_index = torch.stack([r.draft_state["topk_index"] for r in reqs])
        hidden = torch.stack([r.draft_state["hidden"] for r in reqs])  # [B, H]
        rows = torch.tensor([r.row for r in reqs]).to(self.device, non_blocking=True)
        max_len = max(r.kv_len for r in reqs)
        if self.draft_graphs is not None and self.draft_graphs.can_run(len(reqs)):
            return self.draft_graphs.run(topk_p, topk_index, hidden, seq_lens, rows, max_len)
        return self._grow_tree_tensors(topk_p, topk_index, hidden, seq_lens, rows, max_len)

    def _grow_tree_tensors(self, topk_p, topk_index, hidden, seq_lens, rows, width: int):
        """The draft steps on tensors only (no host sync, fixed shapes for a given batch and prefix width), so a
        CUDA graph can capture them. width >= every request's draft-KV length."""
        topk = self.topk
        ctx = _TreeDraftAttention(self, rows, seq_lens, width)
        score_list, token_list, parents_list = [], [], []
        scores = None
        for step in range(self.num_steps):
            input_ids, parent_rows, scores, info = select_top_k(step, topk_p, topk_index, hidden, scores, topk)
            score_list.append(info[0])
            token_list.append(info[1])
            parents_list.append(info[2])
            if step == self.num_steps - 1:
                break
            hidden = hidden[parent_rows]
            ctx.begin_step(parent_rows)
            positions = (seq_lens + step).repeat_interleave(topk)
            _, hidden = self.draft(self._embed(input_ids), hidden, positions, ctx, None)
            topk_p, topk_index = self._draft_topk(hidden)
        return organize(score_list, token_list, parents_list, self.num_draft_tokens)


class _LazyGraphs:
    """CUDA graphs of one draft computation on fixed buffers, one per (batch bucket, prefix-width bucket), captured
    on first use (an iteration that captures is no adaptive-rate sample: see Engine._run_decode). A failed capture
    is logged and the computation runs eagerly from then on. capture=False runs the buffers eagerly (CPU tests)."""

    name = "draft"

    def __init__(self, worker: EagleWorker, max_bs: int, capture: bool = True):
        from serving.cuda_graph_runner import batch_buckets

        self.worker = worker
        self.buckets = batch_buckets(max_bs)
        self.max_bs = max_bs
        self.capture = capture
        self.table_width = worker.runner.req_to_token.table.shape[1]
        self.graphs: dict[tuple[int, int], object] = {}
        self.outputs: dict[tuple[int, int], tuple] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.failed = False

    def can_run(self, batch_size: int) -> bool:
        return batch_size <= self.max_bs and not self.failed

    def bucket(self, batch_size: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, batch_size)]

    def width(self, max_len: int) -> int:
        """Prefix-width bucket: powers of two from 256, capped at the req_to_token table's width."""
        w = 256
        while w < max_len:
            w *= 2
        return min(w, self.table_width)

    def _fn(self, bs: int, width: int):
        raise NotImplementedError

    def _pad(self, bs: int) -> None:
        """Fill the first bs requests' buffers as padding (row 0, scratch slot 0), so a capture outside an
        iteration touches no live request's draft KV."""
        raise NotImplementedError

    def capture_up_to(self, batch_size: int, max_len: int) -> int:
        """Capture now, not on first use inside an iteration, the graphs of every batch bucket up to batch_size's
        and every prefix width up to max_len's; returns how many it captured."""
        if not self.capture or self.failed:
            return 0
        top = self.bucket(min(batch_size, self.max_bs))
        widths, top_width = [self.width(1)], self.width(max_len)
        while widths[-1] < top_width:
            widths.append(self.width(2 * widths[-1]))
        before = len(self.graphs)
        for bs in self.buckets[: self.buckets.index(top) + 1]:
            for width in widths:
                if (bs, width) not in self.graphs and not self.failed:
                    self._pad(bs)
                    self.replay((bs, width))
        return len(self.graphs) - before

    def replay(self, key: tuple[int, int]) -> tuple:
        """The outputs for the buffers' current contents: graph replay, capturing it first if new."""
        if self.capture and key not in self.graphs and not self.failed:
            from serving.cuda_graph_runner import capture_graph

            try:
                self.graphs[key], self.outputs[key] = capture_graph(self._fn(*key), self.pool)
                logger.info("captured a %s CUDA graph for batch %d, prefix width %d", self.name, *key)
            except Exception:  # keep speculating, eagerly from the next iteration on
                logger.exception("capturing the %s failed; running it eagerly", self.name)
                self.failed = True
        if key in self.graphs:
            self.graphs[key].replay()
            return self.outputs[key]
        return self._fn(*key)()


class _ExtendDraftAttention:
    """attn_fn for the fixed-shape draft extend: stores the new tokens' K/V by slot (padding to scratch slot 0),
    then each token attends to its request's draft KV up to its own position, gathered at a fixed width."""

    def __init__(self, worker: EagleWorker, rows, seq_lens, positions, loc, width: int):
        self.kv, self.loc = worker.draft_kv, loc
        self.scale = worker.draft.config.head_dim**-0.5
        self.slots = worker.runner.req_to_token.table[rows, :width].long()  # [B, W]
        b = rows.shape[0]
        keys = torch.arange(width, device=rows.device)[None, None, :]
        self.mask = (keys <= positions.view(b, -1)[:, :, None]) & (keys < seq_lens[:, None, None])  # [B, E, W]

    def __call__(self, q, k, v, _ctx):
        self.kv.k[0, self.loc] = k
        self.kv.v[0, self.loc] = v
        b, e = self.mask.shape[:2]
        hq, d = q.shape[1], q.shape[2]
        keys, vals = self.kv.k[0, self.slots], self.kv.v[0, self.slots]  # [B, W, Hkv, D]
        qh = q.view(b, e, hq, d).transpose(1, 2)  # [B, Hq, E, D]
        out = grouped_attention(qh, keys.transpose(1, 2), vals.transpose(1, 2), self.mask, self.scale)
        return out.transpose(1, 2).reshape(b * e, hq, d)


class _DraftExtendGraphs(_LazyGraphs):
    """The draft extend after a verify (each request's accepted tokens plus the bonus: 1..num_steps+1 of them) on
    fixed buffers of num_steps+1 tokens per request. Padded tokens store to scratch slot 0 and are never read back."""

    name = "draft-extend"

    def __init__(self, worker: EagleWorker, max_bs: int, capture: bool = True):
        super().__init__(worker, max_bs, capture)
        self.per_req = worker.num_steps + 1
        dev, n = worker.device, max_bs * (worker.num_steps + 1)
        aux_width = len(worker.runner.aux_layer_ids) * worker.runner.model_config.hidden_size
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.loc = torch.zeros(n, dtype=torch.int64, device=dev)
        self.aux = torch.zeros(n, aux_width, dtype=worker.runner.dtype, device=dev)
        self.rows = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int64, device=dev)
        self.last = torch.zeros(max_bs, dtype=torch.int64, device=dev)

    def _fn(self, bs: int, width: int):
        n = bs * self.per_req
        return lambda: self.worker._draft_extend_tensors(
            self.ids[:n], self.aux[:n], self.positions[:n], self.loc[:n], self.rows[:bs], self.seq_lens[:bs],
            self.last[:bs], width,
        )  # fmt: skip

    def _pad(self, bs: int) -> None:
        n = bs * self.per_req
        for buf in (self.ids, self.positions, self.loc, self.aux):
            buf[:n].zero_()
        self.rows[:bs].zero_()
        self.seq_lens[:bs].fill_(1)
        self.last[:bs].copy_(torch.arange(bs, device=self.last.device) * self.per_req)

    def run(self, reqs: list[Req], starts: list[int], tokens: list[list[int]], slots: list[torch.Tensor],
            aux_rows: list[torch.Tensor], aux: torch.Tensor) -> None:  # fmt: skip
        """As `EagleWorker._draft_extend` for the accepted tokens of each request: starts[i] is its first position,
        tokens[i] the *next* tokens, slots[i] their KV slots, aux_rows[i] their rows in the verify's aux [B*N, 3H]."""
        b, e = len(reqs), self.per_req
        bs = self.bucket(b)
        pad = bs - b
        # Host rows as plain lists, one tensor per buffer: per request, n real tokens then e - n of padding (token 0,
        # scratch slot 0, the last real position and aux row); padded requests: row 0, one token.
        ids, positions, loc, rows_in = [], [], [], []
        for start, toks, kept, path in zip(starts, tokens, slots, aux_rows):
            n, gap = len(toks), e - len(toks)
            path = path.tolist()
            ids += toks + [0] * gap
            positions += [start + min(j, n - 1) for j in range(e)]
            loc += kept.tolist() + [0] * gap
            rows_in += path + [path[-1]] * gap
        for buf in (ids, positions, loc, rows_in):
            buf += [0] * (pad * e)
        seq_lens = [start + len(toks) for start, toks in zip(starts, tokens)] + [1] * pad
        last = [i * e + len(toks) - 1 for i, toks in enumerate(tokens)] + [i * e for i in range(b, bs)]
        dev, n_tok = self.worker.device, bs * e

        def fill(buf, values):
            buf[: len(values)].copy_(torch.tensor(values, dtype=torch.int64), non_blocking=True)

        fill(self.ids, ids)
        fill(self.positions, positions)
        fill(self.loc, loc)
        self.aux[:n_tok].copy_(aux[torch.tensor(rows_in).to(dev, non_blocking=True)])
        fill(self.rows, [req.row for req in reqs] + [0] * pad)
        fill(self.seq_lens, seq_lens)
        fill(self.last, last)
        out = self.replay((bs, self.width(max(seq_lens))))
        hidden, p, idx = (o[:b].clone() for o in out)  # the buffers are rewritten by the next replay
        self.worker._store_draft_state(reqs, hidden, p, idx, seq_lens)


class _TreeDraftAttention:
    """attn_fn for draft tree steps: each node attends to its request's draft KV prefix, its ancestors and itself.

    Tree K/V stay in local tensors (never in the pool): they are scratch for this iteration only."""

    def __init__(self, worker: EagleWorker, rows: torch.Tensor, seq_lens: torch.Tensor, width: int):
        self.topk = worker.topk
        self.scale = worker.draft.config.head_dim**-0.5
        kv = worker.draft_kv
        slots = worker.runner.req_to_token.table[rows, :width].long()  # [B, W]
        self.prefix_k = kv.k[0, slots]  # [B, W, Hkv, D]
        self.prefix_v = kv.v[0, slots]
        self.prefix_valid = torch.arange(width, device=slots.device)[None, :] < seq_lens[:, None]  # [B, W]
        self.tree_k: list[torch.Tensor] = []  # per step [B, topk, Hkv, D]
        self.tree_v: list[torch.Tensor] = []
        self.ancestors: torch.Tensor | None = None  # [B, topk, steps_so_far] input index at each earlier step
        self.batch = rows.shape[0]
        self.eye = torch.eye(self.topk, dtype=torch.bool, device=slots.device)

    def begin_step(self, parent_rows: torch.Tensor) -> None:
        B, topk = self.batch, self.topk
        if not self.tree_k:
            self.ancestors = torch.zeros(B, topk, 0, dtype=torch.long, device=parent_rows.device)
            return
        parent_local = (parent_rows % topk).view(B, topk)  # which previous-step node each new node continues
        prev = self.ancestors.gather(1, parent_local[:, :, None].expand(-1, -1, self.ancestors.shape[2]))
        self.ancestors = torch.cat([prev, parent_local[:, :, None]], dim=2)

    def __call__(self, q, k, v, _ctx):
        B, topk = self.batch, self.topk
        hq, d = q.shape[1], q.shape[2]
        self.tree_k.append(k.view(B, topk, *k.shape[1:]))
        self.tree_v.append(v.view(B, topk, *v.shape[1:]))
        steps = len(self.tree_k)
        keys = torch.cat([self.prefix_k] + self.tree_k, dim=1)  # [B, L + steps*topk, Hkv, D]
        vals = torch.cat([self.prefix_v] + self.tree_v, dim=1)
        tree_mask = torch.zeros(B, topk, steps * topk, dtype=torch.bool, device=q.device)
        for s in range(steps - 1):
            idx = s * topk + self.ancestors[:, :, s]  # [B, topk]
            tree_mask.scatter_(2, idx[:, :, None], True)
        tree_mask[:, :, (steps - 1) * topk :] |= self.eye  # each node sees itself (no host scalar: graph-safe)
        mask = torch.cat([self.prefix_valid[:, None, :].expand(-1, topk, -1), tree_mask], dim=2)  # [B, topk, T]
        qh = q.view(B, topk, hq, d).transpose(1, 2)  # [B, Hq, topk, D]
        out = grouped_attention(qh, keys.transpose(1, 2), vals.transpose(1, 2), mask, self.scale)
        return out.transpose(1, 2).reshape(B * topk, hq, d)


class _DraftTreeGraphs(_LazyGraphs):
    """The draft's tree growth on fixed buffers. Padded requests have zero scores and row 0; their nodes are dropped
    after the replay."""

    name = "draft-tree"

    def __init__(self, worker: EagleWorker, max_bs: int, capture: bool = True):
        super().__init__(worker, max_bs, capture)
        dev, topk = worker.device, worker.topk
        hidden_size = worker.draft.config.hidden_size
        self.topk_p = torch.zeros(max_bs, topk, dtype=torch.float32, device=dev)
        self.topk_index = torch.zeros(max_bs, topk, dtype=torch.int64, device=dev)
        self.hidden = torch.zeros(max_bs, hidden_size, dtype=worker.runner.dtype, device=dev)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int64, device=dev)
        self.rows = torch.zeros(max_bs, dtype=torch.int64, device=dev)

    def _fn(self, bs: int, width: int):
        return lambda: self.worker._grow_tree_tensors(
            self.topk_p[:bs], self.topk_index[:bs], self.hidden[:bs], self.seq_lens[:bs], self.rows[:bs], width
        )

    def _pad(self, bs: int, start: int = 0) -> None:
        for buf in (self.topk_p, self.topk_index, self.hidden, self.rows):
            buf[start:bs].zero_()
        self.seq_lens[start:bs].fill_(1)

    def run(self, topk_p, topk_index, hidden, seq_lens, rows, max_len: int):
        b = topk_p.shape[0]
        bs = self.bucket(b)
        if bs != b:
            self._pad(bs, start=b)
        self.topk_p[:b].copy_(topk_p)
        self.topk_index[:b].copy_(topk_index)
        self.hidden[:b].copy_(hidden)
        self.seq_lens[:b].copy_(seq_lens)
        self.rows[:b].copy_(rows)
        out = self.replay((bs, self.width(max_len)))
        return tuple(o[:b] for o in out)
