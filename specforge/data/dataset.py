"""Normalized JSONL -> tokenized `datasets.Dataset` with `input_ids` and `loss_mask` columns, cached by `datasets`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import datasets
from jinja2.exceptions import TemplateError

from .formats import RowError, validate_normalized
from .template import render_conversation, resolve_chat_template, template_markers, tokenize_rendered

logger = logging.getLogger(__name__)


def _tokenize_batch(batch: dict, tokenizer, max_length: int, chat_template: str, enable_thinking: bool | None):
    reasons = [""] * len(batch["id"])
    rendered = {}
    for k, (row_id, conversations) in enumerate(zip(batch["id"], batch["conversations"])):
        try:
            # The id only names the row here: numeric ids (other tools write them) are fine.
            validate_normalized({"id": str(row_id), "conversations": conversations})
            rendered[k] = render_conversation(tokenizer, conversations, chat_template, enable_thinking)
        except (RowError, ValueError, TemplateError) as e:
            # TemplateError: templates refuse some conversations themselves (raise_exception, e.g. no system role).
            reasons[k] = f"row {row_id!r}: {e}"
    tokens = dict(zip(rendered, tokenize_rendered(tokenizer, list(rendered.values()), max_length)))
    out: dict[str, list] = {"input_ids": [], "loss_mask": [], "drop_reason": reasons}
    for k in range(len(reasons)):
        row = tokens.get(k, {"input_ids": [], "loss_mask": []})
        if k in tokens and not any(row["loss_mask"]):
            reasons[k] = "no assistant tokens within max_length"
        out["input_ids"].append(row["input_ids"])
        out["loss_mask"].append(row["loss_mask"])
    return out


def tokenize_rows(
    jsonl_path: str | os.PathLike,
    tokenizer,
    max_length: int,
    chat_template: str | None = None,
    num_proc: int = 1,
    cache_dir: str | None = None,
    enable_thinking: bool | None = None,
) -> datasets.Dataset:
    """Every row of a normalized JSONL file tokenized as `build_dataset` does, in file order, with a `drop_reason`
    column ("" for the rows training keeps)."""
    path = Path(jsonl_path)
    if not path.is_file():
        raise FileNotFoundError(f"training data {path} does not exist (make it with `specforge prepare-data`)")
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    template, enable_thinking = resolve_chat_template(tokenizer, chat_template, enable_thinking)
    # Fail here, once, on a template the mask cannot be derived from, not in every worker.
    template_markers(tokenizer, template, enable_thinking)

    raw = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
    missing = [c for c in ("id", "conversations") if c not in raw.column_names]
    if missing:
        raise ValueError(f"{path}: rows lack field(s) {missing}; expected normalized rows {{'id', 'conversations'}}")
    if num_proc > 1:
        # Rust tokenizer threads and forked workers deadlock (huggingface/tokenizers#1391).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return raw.map(
        _tokenize_batch,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=raw.column_names,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_length": max_length,
            "chat_template": template,
            "enable_thinking": enable_thinking,
        },
        desc="Tokenizing conversations",
    )


def build_dataset(
    jsonl_path: str | os.PathLike,
    tokenizer,
    max_length: int,
    chat_template: str | None = None,
    num_proc: int = 1,
    cache_dir: str | None = None,
    enable_thinking: bool | None = None,
) -> datasets.Dataset:
    """Tokenize a normalized JSONL file (see specforge.data.formats) for EAGLE-3 training.

    Returns a Dataset with exactly the columns `input_ids` and `loss_mask` (lists of ints, one conversation per row,
    at most `max_length` tokens). Rows with no loss tokens (no assistant turn, or all of it past `max_length`) and
    rows that fail validation are dropped and counted in a log line. `datasets` caches the tokenized result under
    `cache_dir` (its default cache if None), keyed on the file, tokenizer, template and arguments.
    """
    path = Path(jsonl_path)
    tokenized = tokenize_rows(path, tokenizer, max_length, chat_template, num_proc, cache_dir, enable_thinking)
    reasons = tokenized["drop_reason"]
    dropped = [r for r in reasons if r]
    if dropped:
        no_tokens = sum(r == "no assistant tokens within max_length" for r in dropped)
        others = [r for r in dropped if r != "no assistant tokens within max_length"]
        logger.warning(
            "%s: dropped %d of %d rows (%d with no assistant tokens within max_length=%d, %d invalid%s)",
            path,
            len(dropped),
            len(reasons),
            no_tokens,
            max_length,
            len(others),
            f"; first: {others[0]}" if others else "",
        )
        keep = [i for i, r in enumerate(reasons) if not r]
        if not keep:
            raise ValueError(f"{path}: no usable rows ({dropped[0] if others else 'no assistant tokens'} ...)")
        tokenized = tokenized.select(keep)
    return tokenized.remove_columns("drop_reason")
