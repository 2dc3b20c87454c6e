"""The engine: admits requests, schedules prefill chunks and decode steps (continuous batching), manages KV
(prefix cache, eviction, preemption), samples, detokenizes and reports outputs. Runs in one background thread."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque

import torch

from serving import cuda_graph_runner
from serving.config import EngineConfig
from serving.model_runner import ModelRunner
from serving.models.loader import LoadedTarget, load_target
from serving.radix_cache import RadixCache
from serving.request import Req, ReqStatus, RequestOutput, SpecStats
from serving.sampling import InvalidRequest, SamplingParams, sample

logger = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Engine:
    def __init__(self, cfg: EngineConfig, target: LoadedTarget | None = None):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.random_seed)
        self.target = target or load_target(cfg.model, cfg.dtype, self.device, cfg.served_model_name)
        self.target.model.to(self.device)
        self.target.model.requires_grad_(False)
        self.tokenizer = self.target.tokenizer
        self.runner = ModelRunner(cfg, self.target, self.device)
        self.allocator = self.runner.allocator
        self.tree_cache = RadixCache(self.allocator, enabled=not cfg.disable_radix_cache)
        self.context_length = self.runner.context_length
        self.eos_token_ids = self._eos_ids()
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._reqs: dict[str, Req] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._last_was_extend = False
        self.metrics = None  # set by the server (serving.metrics.EngineMetrics)
        self.num_preemptions = 0
        self.spec_worker = None
        if cfg.speculative:
            from serving.speculative.eagle_worker import EagleWorker

            self.spec_worker = EagleWorker(self)
        self.runner.init_cuda_graphs()
        # waits for the device's queued work (timing); nothing to wait for on CPU
        self.cuda_sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

    # --- public API (thread-safe) -----------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.target.served_name

    def _eos_ids(self) -> frozenset[int]:
        ids = set()
        eos = getattr(self.target.hf_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        vocab = self.runner.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        if len(prompt_ids) + params.max_tokens > self.context_length:
            raise InvalidRequest(
                f"this model's maximum context length is {self.context_length} tokens; the prompt has "
                f"{len(prompt_ids)} and max_tokens is {params.max_tokens}",
                "max_tokens",
            )
        if len(prompt_ids) + 1 > self.allocator.capacity:
            raise InvalidRequest("the prompt does not fit in the KV cache", "prompt")

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, on_output=None, rid: str | None = None, stream=True
    ) -> Req:
        """Queue a request. stream=False: on_output is called once, with the whole text, when it finishes."""
        self.check_prompt(prompt_ids, params)
        req = Req(rid or uuid.uuid4().hex, list(prompt_ids), params, self.eos_token_ids, on_output, stream=stream)
        if self.spec_worker is not None:
            req.spec = SpecStats()
        self._inbox.put(("add", req))
        self._wake.set()
        return req

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid))
        self._wake.set()

    def flush_cache(self, timeout: float = 30.0) -> bool:
        """Drop the prefix cache (only when no request is in flight). Returns whether it was flushed."""
        if self._thread is None:
            return self._flush()
        done = threading.Event()
        result = []
        self._inbox.put(("flush", (done, result)))
        self._wake.set()
        done.wait(timeout)
        return bool(result and result[0])

    def _flush(self) -> bool:
        if self.running or self.waiting:
            return False
        self.tree_cache.reset()
        return True

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the engine thread; requests still in flight then end as aborts (their KV freed, their waiters told)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():  # a step stuck past the timeout: leave its state alone
                return
            self._thread = None
        self._drain_inbox()
        for req in list(self.running) + list(self.waiting):
            self._finish(req, "abort", error="the server is shutting down")

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Req]:
        """Blocking batch generation in the caller's thread (tests, benchmarks); returns finished requests."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.submit(p, sp, stream=False) for p, sp in zip(prompts, plist)]
        if self._thread is not None:
            while not all(r.finished for r in reqs):
                time.sleep(0.002)
            return reqs
        while not all(r.finished for r in reqs):
            self.step()
        return reqs

    def is_idle(self) -> bool:
        return not self.running and not self.waiting and self._inbox.empty()

    # --- loop ---------------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.step()
            except Exception:  # one bad step must not kill the server; fail the requests involved
                logger.exception("engine step failed; aborting the running requests")
                for req in list(self.running) + list(self.waiting):
                    self._finish(req, "abort", error="internal error in the engine step")
                worked = True
            if not worked:
                self._wake.wait(0.05)
                self._wake.clear()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._reqs[item.rid] = item
                self.waiting.append(item)
            elif kind == "flush":
                done, result = item
                result.append(self._flush())
                done.set()
            elif kind == "abort":
                req = self._reqs.get(item)
                if req is not None and not req.finished:
                    self._finish(req, "abort")

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduling step. Returns False when there was nothing to do."""
        self._drain_inbox()
        did = False
        if self.waiting and not (self._last_was_extend and self.running):
            did = self._run_extend()
            self._last_was_extend = did
        if not did and self.running:
            self._last_was_extend = False
            self._run_decode()
            did = True
        if self.metrics is not None:
            self.metrics.observe_engine(self)
        return did

    # --- KV management ------------------------------------------------------------------------------------------

    def _alloc(self, n: int) -> torch.Tensor | None:
        slots = self.allocator.alloc(n)
        if slots is None:
            self.tree_cache.evict(n - self.allocator.num_free)
            slots = self.allocator.alloc(n)
        return slots

    def _release_kv(self, req: Req) -> None:
        """Give the request's KV back to the prefix cache (reusable by later requests, evictable when unlocked)."""
        if req.row is None:
            return
        kv_tokens = req.all_ids[: req.kv_len]
        self.tree_cache.insert(kv_tokens, req.slots[: len(kv_tokens)])
        self.allocator.free(req.slots[len(kv_tokens) :])
        self._unadmit(req)

    def _preempt(self, req: Req) -> None:
        self.running.remove(req)
        self._release_kv(req)
        req.status = ReqStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        if self.metrics is not None:
            self.metrics.preemptions.inc()
        if self.spec_worker is not None:
            self.spec_worker.on_release(req)
        self.waiting.appendleft(req)

    # --- extend (prefill) ---------------------------------------------------------------------------------------

    def _admit(self, req: Req) -> bool:
        """Give a waiting request a req_to_token row and its cached prefix."""
        row = self.runner.req_to_token.alloc()
        if row is None:
            return False
        req.row = row
        tokens = req.all_ids[: req.seq_len - 1]  # the last token is always computed (its logits are needed)
        slots, node = self.tree_cache.match_prefix(tokens)
        if self.spec_worker is not None and slots.numel():
            # The last matched position's draft KV was made with a next token this request may not share.
            slots, node = self.tree_cache.match_prefix(tokens[: slots.numel() - 1])
        self.tree_cache.inc_lock(node)
        req.prefix_node = node
        req.slots = slots.clone()
        req.num_prefix_slots = slots.numel()
        if not req.output_ids:
            req.cached_tokens = slots.numel()
        if slots.numel():
            self.runner.req_to_token.write(row, 0, slots)
        return True

    def _run_extend(self) -> bool:
        budget = self.cfg.chunked_prefill_size
        batch, new_slots = [], []
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) + len(batch) >= self.cfg.max_running_requests:
                break
            if req.row is None and not self._admit(req):
                break
            n = min(req.seq_len - req.kv_len, budget)
            # Leave room for the running requests' next decode step, so admitting never forces a preemption.
            reserve = len(self.running) * self._decode_slots_per_req()
            slots = self._alloc(n + reserve) if n else None
            if slots is None:
                if not batch and not self.running:
                    self._fail_unschedulable(req)
                elif req.kv_len == req.num_prefix_slots:
                    self._unadmit(req)  # nothing computed yet: hold no row or cache lock while waiting
                break
            self.allocator.free(slots[n:])
            batch.append(req)
            new_slots.append(slots[:n])
            budget -= n
        if not batch:
            return False
        fb = self.runner.build_extend(batch, new_slots, capture_aux=self.spec_worker is not None)
        hidden, aux = self.runner.forward(fb)
        done_rows, done_reqs = [], []
        offset = 0
        for req, slots in zip(batch, new_slots):
            req.slots = torch.cat([req.slots, slots])
            offset += slots.numel()
            if req.kv_len == req.seq_len:  # whole sequence has KV: sample its next token
                done_rows.append(offset - 1)
                done_reqs.append(req)
        for req in done_reqs:
            self.waiting.remove(req)
            req.status = ReqStatus.RUNNING
            self.running.append(req)
        if done_reqs:
            logits = self.runner.model.compute_logits(hidden[done_rows])
            tokens = sample(logits, [r.params for r in done_reqs], [len(r.output_ids) for r in done_reqs])
            if self.spec_worker is not None:
                self.spec_worker.after_prefill(fb, batch, new_slots, hidden, aux, done_reqs, tokens)
            self._commit(done_reqs, [[t] for t in tokens.tolist()])
        elif self.spec_worker is not None:
            self.spec_worker.after_prefill(fb, batch, new_slots, hidden, aux, [], None)
        return True

    def _unadmit(self, req: Req) -> None:
        if req.prefix_node is not None:
            self.tree_cache.dec_lock(req.prefix_node)
            req.prefix_node = None
        self.runner.req_to_token.free(req.row)
        req.row = None
        req.slots = torch.empty(0, dtype=torch.int64)

    def _fail_unschedulable(self, req: Req) -> None:
        self._finish(req, "abort", error="the request does not fit in the KV cache")

    def _decode_slots_per_req(self) -> int:
        if self.spec_worker is not None and self.spec_worker.should_speculate(len(self.running)):
            return self.spec_worker.slots_per_step
        return 1

    # --- decode -------------------------------------------------------------------------------------------------

    def _run_decode(self) -> None:
        reqs = list(self.running)
        before = sum(len(r.output_ids) for r in reqs)
        captures = cuda_graph_runner.captures
        start = time.perf_counter()
        speculative = self._decode_step()
        # An iteration that captured a CUDA graph (a new batch or width bucket) timed a one-off cost, not a rate.
        if self.spec_worker is not None and cuda_graph_runner.captures == captures:
            committed = sum(len(r.output_ids) for r in reqs) - before
            self.spec_worker.record(speculative, len(reqs), committed, time.perf_counter() - start)

    def _continuous_steps(self) -> int:
        """Plain decode steps to run back to back: each step's sampled tokens feed the next on the device, and the
        host reads them once at the end (one sync and one round of scheduling per run instead of per token)."""
        k = self.cfg.num_continuous_decode_steps or (8 if self.device.type == "cuda" else 1)
        room = min(self.context_length - r.seq_len for r in self.running)
        wanted = max(r.params.max_tokens - len(r.output_ids) for r in self.running)
        return max(1, min(k, room, wanted))

    def _decode_step(self) -> bool:
        """One decode iteration over the running batch; returns whether it speculated."""
        per_req = self._decode_slots_per_req()
        steps = self._continuous_steps() if per_req == 1 else 1
        slots = self._alloc(len(self.running) * per_req * steps)
        if slots is None and steps > 1:
            steps = 1
            slots = self._alloc(len(self.running) * per_req)
        while slots is None and len(self.running) > 1:
            victim = max(self.running, key=lambda r: r.arrival_time)
            self._preempt(victim)
            slots = self._alloc(len(self.running) * per_req)
        if slots is None:
            raise RuntimeError("KV pool cannot hold one decode step of a single request")
        if per_req > 1:
            self.spec_worker.decode_step(self.running, slots)
            return True
        if self.spec_worker is not None:
            self.spec_worker.pending(slots)  # every plain step below stores its aux states by slot
        reqs = list(self.running)
        n = len(reqs)
        grid = slots.view(n, steps)  # row i: request i's slots for steps 0..steps-1
        params = [r.params for r in reqs]
        produced = [len(r.output_ids) for r in reqs]
        if steps == 1:
            fb = self.runner.build_decode(reqs, grid[:, 0], capture_aux=self.spec_worker is not None)
            logits, _, aux = self.runner.decode(fb)
            if self.spec_worker is not None:
                self.spec_worker.store_aux(fb.out_cache_loc, aux)
            runs = [[t] for t in sample(logits, params, produced).tolist()]
        else:
            runs = self._continuous_decode(reqs, grid, params, produced).tolist()
        for req, s in zip(reqs, grid):
            req.slots = torch.cat([req.slots, s])
        self._commit(reqs, runs)
        return False

    def _continuous_decode(self, reqs: list[Req], grid: torch.Tensor, params, produced: list[int]) -> torch.Tensor:
        """grid [B, K] slots -> [B, K] sampled tokens; no host sync until the caller reads them. Tokens after a
        stop condition are cut by _commit, and their slots are freed with the request."""
        runner = self.runner
        rows = runner._tensor([r.row for r in reqs])
        pos0 = runner._tensor([r.kv_len for r in reqs])
        by_step = grid.t().contiguous().to(self.device, non_blocking=True)  # [K, B]: each step's slots contiguous
        spec = self.spec_worker
        k = grid.shape[1]
        if all(p.greedy for p in params) and runner.can_decode_greedy_steps(len(reqs), k, spec is not None):
            # Every step's input is the previous argmax: all K steps in one call (one CUDA graph when captured).
            ids = runner._tensor([r.last_token for r in reqs])
            max_len = max(r.kv_len for r in reqs)
            return runner.decode_greedy_steps(rows, pos0, by_step, ids, max_len, capture_aux=spec is not None)
        tokens, outs = None, []
        for k in range(grid.shape[1]):
            fb = runner.build_decode(
                reqs, by_step[k], input_ids=tokens, offset=k, rows=rows, positions=pos0 + k if k else pos0,
                capture_aux=spec is not None,
            )  # fmt: skip
            logits, _, aux = runner.decode(fb)
            if spec is not None:
                spec.store_aux(fb.out_cache_loc, aux)
            tokens = sample(logits, params, [p + k for p in produced])
            outs.append(tokens)
        return torch.stack(outs, dim=1)

    # --- output -------------------------------------------------------------------------------------------------

    def _commit(self, reqs: list[Req], new_tokens: list[list[int]]) -> None:
        """Append sampled tokens, apply stop conditions (EOS/stop ids/max_tokens/stop strings, cut inside a run)."""
        now = time.monotonic()
        for req, toks in zip(reqs, new_tokens):
            if req.finished:
                continue
            reason = None
            accepted = []
            for t in toks:
                accepted.append(t)
                if (t in req.eos_token_ids and not req.params.ignore_eos) or t in req.params.stop_token_ids:
                    reason = "stop"
                    break
                if len(req.output_ids) + len(accepted) >= req.params.max_tokens:
                    reason = "length"
                    break
                if req.seq_len + len(accepted) >= self.context_length:
                    reason = "length"
                    break
            req.output_ids.extend(accepted)
            if req.first_token_time is None:
                req.first_token_time = now
                if self.metrics is not None:
                    self.metrics.ttft.observe(now - req.arrival_time)
            elif self.metrics is not None:
                self.metrics.itl.observe((now - req.last_token_time) / max(1, len(accepted)))
            req.last_token_time = now
            # Text is needed now only to find stop strings or to stream it; otherwise it is decoded once, at the end.
            if reason is not None or req.params.stop or (req.stream and req.on_output is not None):
                if self._update_text(req, final=reason is not None):
                    reason = "stop"
            if reason is not None:
                self._finish(req, reason)
            elif req.stream:
                self._emit(req, finished=False)

    def _update_text(self, req: Req, final: bool) -> bool:
        """Detokenize incrementally (only the tokens since the last clean boundary are decoded again); returns
        whether a stop string appeared, cutting req.text before it."""
        ids = req.output_ids
        if ids and not req.params.ignore_eos and ids[-1] in req.eos_token_ids:
            ids = ids[:-1]  # EOS only ever ends the output; it is not text
        decode = self.tokenizer.decode
        settled = decode(ids[req.detok_prefix : req.detok_read], skip_special_tokens=True)
        pending = decode(ids[req.detok_prefix :], skip_special_tokens=True)
        # An incomplete UTF-8 sequence decodes to U+FFFD: wait for the tokens that complete it.
        if final or (len(pending) > len(settled) and not pending.endswith("\ufffd")):
            req.decoded += pending[len(settled) :]
            req.detok_prefix, req.detok_read = req.detok_read, len(ids)
        text = req.decoded
        for s in req.params.stop:
            idx = text.find(s)
            if idx != -1:
                req.text = text[:idx]
                return True
        req.text = text
        return False

    def _emit(self, req: Req, finished: bool, error: str | None = None) -> None:
        text = req.text
        if not finished:
            # Hold back an incomplete UTF-8 character and anything that could still become a stop string.
            hold = max((len(s) - 1 for s in req.params.stop), default=0)
            safe = len(text) - hold
            while safe > req.sent_text_len and text[safe - 1] == "\ufffd":
                safe -= 1
            safe = max(safe, req.sent_text_len)
        else:
            safe = len(text)
        delta = text[req.sent_text_len : safe]
        new_ids = req.output_ids[req.sent_token_len :]
        if not delta and not new_ids and not finished:
            return
        req.sent_text_len = safe
        req.sent_token_len = len(req.output_ids)
        if req.on_output is not None:
            req.on_output(
                RequestOutput(
                    rid=req.rid,
                    text_delta=delta,
                    token_ids=new_ids,
                    finished=finished,
                    finish_reason=req.finish_reason,
                    prompt_tokens=len(req.prompt_ids),
                    completion_tokens=len(req.output_ids),
                    cached_tokens=req.cached_tokens,
                    spec=req.spec,
                    error=error,
                )
            )

    def _finish(self, req: Req, reason: str, error: str | None = None) -> None:
        if req.finished:
            return
        req.finish_reason = reason
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self._release_kv(req)
        if self.spec_worker is not None:
            self.spec_worker.on_release(req)
        req.status = ReqStatus.FINISHED
        req.aborted = reason == "abort"
        self._reqs.pop(req.rid, None)
        if self.metrics is not None:
            self.metrics.observe_finished(req)
        if req.detok_read < len(req.output_ids):  # text not kept up to date (not streamed, no stop strings)
            self._update_text(req, final=True)
        self._emit(req, finished=True, error=error)
