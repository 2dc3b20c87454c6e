"""The draft vocabulary: the target tokens the draft head may propose, picked by frequency in assistant text.

Semantics match SpecForge's `generate_vocab_mapping_file` and SGLang's loader: the draft vocabulary is the
`draft_vocab_size` most frequent loss-masked target tokens, sorted ascending by target id;
`d2t[i] = target_id(i) - i` (so `target_id = draft_id + d2t[draft_id]`) and `t2d[target_id]` is True for members.
Ties are broken by the lower token id, and when fewer distinct tokens were seen the vocabulary is filled with the
lowest unseen ids, so the result is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch


def count_tokens(dataset, vocab_size: int | None = None) -> torch.Tensor:
    """Count loss-masked tokens: int64 [vocab_size] (or [max id + 1] if vocab_size is None).

    `dataset` is a `datasets.Dataset` or any iterable of rows with `input_ids` and `loss_mask` (lists, arrays or
    tensors of equal length).
    """
    counts = np.zeros(vocab_size or 0, dtype=np.int64)
    rows: Iterable[Mapping] = dataset
    if hasattr(dataset, "with_format") and hasattr(dataset, "iter"):
        rows = (
            {"input_ids": ids, "loss_mask": mask}
            for batch in dataset.with_format("numpy").iter(batch_size=1024)
            for ids, mask in zip(batch["input_ids"], batch["loss_mask"])
        )
    for n, row in enumerate(rows):
        ids = np.asarray(row["input_ids"], dtype=np.int64).reshape(-1)
        mask = np.asarray(row["loss_mask"]).reshape(-1)
        if ids.shape != mask.shape:
            raise ValueError(f"row {n}: input_ids has {ids.size} tokens but loss_mask has {mask.size}")
        picked = ids[mask.astype(bool)]
        if picked.size == 0:
            continue
        if picked.min() < 0:
            raise ValueError(f"row {n}: negative token id {int(picked.min())}")
        top = int(picked.max())
        if vocab_size is not None and top >= vocab_size:
            raise ValueError(f"row {n}: token id {top} is outside the target vocabulary (vocab_size={vocab_size})")
        if top >= counts.size:
            counts = np.pad(counts, (0, top + 1 - counts.size))
        counts += np.bincount(picked, minlength=counts.size)
    return torch.from_numpy(counts)


def build_vocab_mapping(token_counts, vocab_size: int, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (d2t int64 [draft_vocab_size], t2d bool [vocab_size]).

    `token_counts` is an int tensor [<= vocab_size] of loss-masked token counts (see count_tokens), or a dataset
    that count_tokens accepts.
    """
    if not 0 < draft_vocab_size <= vocab_size:
        raise ValueError(f"draft_vocab_size must be in [1, vocab_size={vocab_size}], got {draft_vocab_size}")
    if not isinstance(token_counts, torch.Tensor):
        token_counts = count_tokens(token_counts, vocab_size)
    if token_counts.dim() != 1:
        raise ValueError(f"token_counts must be 1-D [vocab], got shape {tuple(token_counts.shape)}")
    if token_counts.numel() > vocab_size:
        raise ValueError(f"token_counts has {token_counts.numel()} entries, more than vocab_size={vocab_size}")
    if token_counts.is_floating_point() or (token_counts < 0).any():
        raise ValueError("token_counts must be non-negative integer counts")
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    counts[: token_counts.numel()] = token_counts.to(torch.int64)
    # A stable descending sort keeps equal counts in ascending id order: ties go to the lower id and unseen
    # (zero-count) ids follow every seen one, lowest first.
    order = torch.sort(counts, descending=True, stable=True).indices
    target_ids = order[:draft_vocab_size].sort().values  # [draft_vocab_size]
    d2t = target_ids - torch.arange(draft_vocab_size, dtype=torch.int64)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[target_ids] = True
    return d2t, t2d


def remap_lm_head(
    src_weight: torch.Tensor | None, src_ids: torch.Tensor, new_ids: torch.Tensor, target_head: torch.Tensor
) -> tuple[torch.Tensor, str]:
    """A draft lm_head for vocabulary `new_ids` (target ids, ascending) from one trained over `src_ids`.

    Rows of tokens in both are copied. The others come from the target's lm_head rows [V, Ht] through the linear map
    that best turns target rows into the trained draft rows on the shared tokens (least squares), so a new token
    starts where the trained head would roughly have put it. A source without an lm_head reads the target's: its
    rows are the target's own. Returns (weight [len(new_ids), H] fp32, a one-line report).
    """
    if src_weight is None:
        return target_head[new_ids].clone(), f"{len(new_ids)} rows from the target's lm_head (the source had none)"
    src_weight = src_weight.detach().float().cpu()
    pos_in_src = torch.full((target_head.shape[0],), -1, dtype=torch.int64)
    pos_in_src[src_ids] = torch.arange(len(src_ids))
    where = pos_in_src[new_ids]  # [Vd_new]: row in the source head, or -1
    kept = where >= 0
    weight = torch.empty(len(new_ids), src_weight.shape[1], dtype=torch.float32)
    weight[kept] = src_weight[where[kept]]
    fresh = int((~kept).sum())
    if fresh == 0:
        return weight, f"all {len(new_ids)} rows kept"
    basis = target_head[src_ids].float()
    mapping = torch.linalg.lstsq(basis, src_weight).solution  # [Ht, H]
    residual = float((basis @ mapping - src_weight).norm() / src_weight.norm().clamp_min(1e-12))
    weight[~kept] = target_head[new_ids[~kept]].float() @ mapping
    return weight, (f"{int(kept.sum())} rows kept, {fresh} mapped from the target's lm_head "
                    f"(least-squares fit on the shared rows, relative residual {residual:.2f})")
