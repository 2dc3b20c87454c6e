"""A request's life in the engine: tokens, KV slots, detokenized text, finish state, timings."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from serving.sampling import SamplingParams


class ReqStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass
class SpecStats:
    num_verify_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def accept_length(self) -> float:
        """Tokens committed per verify step (accepted drafts + the bonus token), as SGLang reports it."""
        if not self.num_verify_steps:
            return 0.0
        return (self.num_accepted_tokens + self.num_verify_steps) / self.num_verify_steps

    def as_dict(self) -> dict:
        return {
            "accept_length": round(self.accept_length, 4),
            "num_verify_steps": self.num_verify_steps,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
        }


@dataclass
class RequestOutput:
    rid: str
    text_delta: str
    token_ids: list[int]  # new tokens since the last event
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    spec: SpecStats | None = None
    error: str | None = None


@dataclass(eq=False)
class Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    on_output: Callable[[RequestOutput], None] | None = None
    stream: bool = True  # False: on_output hears only the finished output (no per-token events, no detokenizing)
    output_ids: list[int] = field(default_factory=list)
    status: ReqStatus = ReqStatus.WAITING
    finish_reason: str | None = None
    row: int | None = None  # req_to_token row while it holds KV
    slots: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))  # KV of all_ids[:kv_len]
    prefix_node: object = None  # locked radix node
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (reported in usage)
    num_prefix_slots: int = 0  # slots shared with the prefix cache at admission
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None
    text: str = ""  # what the client sees: decoded output, cut before a stop string
    decoded: str = ""  # incremental detokenization of output_ids[:detok_read]
    detok_prefix: int = 0
    detok_read: int = 0
    sent_text_len: int = 0
    sent_token_len: int = 0
    aborted: bool = False
    spec: SpecStats | None = None
    draft_state: dict = field(default_factory=dict)  # speculative decoding's per-request state

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        """all_ids[-1] without building all_ids (the decode input, read every step)."""
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def kv_len(self) -> int:
        return self.slots.numel()

    @property
    def decode_ready(self) -> bool:
        return self.kv_len == self.seq_len - 1 and bool(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is ReqStatus.FINISHED
