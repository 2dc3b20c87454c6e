"""Prometheus metrics of one engine (own registry, so several engines can live in one process)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class EngineMetrics:
    def __init__(self, model_name: str, max_draft_positions: int = 16):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("inter_token_latency_seconds", "Inter-token latency", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(
            "e2e_request_latency_seconds", "End-to-end request latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.running = Gauge("num_running_reqs", "Requests decoding", registry=r)
        self.queued = Gauge("num_queue_reqs", "Requests waiting for prefill", registry=r)
        self.token_usage = Gauge("token_usage", "Fraction of KV slots in use (prefix cache included)", registry=r)
        self.kv_free = Gauge("kv_free_slots", "Free KV slots", registry=r)
        self.preemptions = Counter("num_preemptions", "Requests preempted for lack of KV", registry=r)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("generation_tokens", "Tokens generated", registry=r)
        self.cached_tokens = Counter("cached_tokens", "Prompt tokens served from the prefix cache", registry=r)
        self.requests = Counter("requests", "Finished requests", ["finish_reason"], registry=r)
        self.spec_accept_length = Gauge(
            "spec_accept_length", "Mean tokens committed per verify step (last 1000 steps)", registry=r
        )
        self.spec_accept_rate = Gauge(
            "spec_accept_rate", "Accepted draft tokens / drafted tokens (last 1000 steps)", registry=r
        )
        self.spec_verify_steps = Counter("spec_verify_steps", "Verify forwards", registry=r)
        self.spec_accepted_per_position = Counter(
            "spec_accepted_tokens_per_position", "Draft tokens accepted at each tree depth", ["position"], registry=r
        )
        self.spec_proposed_per_position = Counter(
            "spec_proposed_tokens_per_position", "Verify steps reaching each tree depth", ["position"], registry=r
        )
        self._window: list[tuple[int, int, int]] = []  # (steps, accepted, drafted)
        self.model_name = model_name
        self.started = time.time()

    def observe_engine(self, engine) -> None:
        self.running.set(len(engine.running))
        self.queued.set(len(engine.waiting))
        alloc = engine.allocator
        self.kv_free.set(alloc.num_free)
        self.token_usage.set(1 - alloc.num_free / alloc.capacity)

    def observe_finished(self, req) -> None:
        self.requests.labels(req.finish_reason or "unknown").inc()
        self.e2e.observe(time.monotonic() - req.arrival_time)
        self.prompt_tokens.inc(len(req.prompt_ids))
        self.generation_tokens.inc(len(req.output_ids))
        self.cached_tokens.inc(req.cached_tokens)

    def observe_spec_step(self, accept_lengths: list[int], draft_tokens_per_req: int, depth: int) -> None:
        """accept_lengths: accepted draft tokens (bonus excluded) of each request in one verify step."""
        n = len(accept_lengths)
        self.spec_verify_steps.inc(n)
        for d in range(depth):
            hits = sum(1 for a in accept_lengths if a > d)
            self.spec_accepted_per_position.labels(str(d)).inc(hits)
            self.spec_proposed_per_position.labels(str(d)).inc(n)
        self._window.append((n, sum(accept_lengths), n * depth))
        self._window = self._window[-1000:]
        steps = sum(w[0] for w in self._window)
        accepted = sum(w[1] for w in self._window)
        drafted = sum(w[2] for w in self._window)
        self.spec_accept_length.set((accepted + steps) / steps if steps else 0)
        self.spec_accept_rate.set(accepted / drafted if drafted else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
