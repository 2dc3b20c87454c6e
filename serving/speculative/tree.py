"""Draft-tree growth in SGLang's encoding: per step, the top-k children of each of the top-k current nodes,
scored by cumulative draft probability; the best num_draft_tokens - 1 candidates form the tree.

Candidates live in a flattened "score space" per request: step 0 contributes topk entries, every later step
topk * topk (topk children of each of topk parents). `parents_list[i]` holds the score-space index of the nodes
expanded at step i + 1 (entry 0 of step 0 is the root, -1), so `parent_list[s // topk]` is the parent of
candidate s.
"""

from __future__ import annotations

import torch


def select_top_k(step: int, topk_p, topk_index, hidden, scores, topk: int):
    """One growth step. topk_p/topk_index: [B*topk or B, topk] children of the current nodes.

    Returns (input_ids [B*topk], parent_rows [B*topk] rows of `hidden` each new node continues from,
    scores [B, topk], (step_scores [B, *, topk], step_tokens [B, n], parents [B, topk(+1)])).
    """
    if step == 0:
        batch = topk_p.shape[0]
        input_ids = topk_index.flatten()  # [B*topk]
        parent_rows = torch.arange(batch, device=topk_p.device).repeat_interleave(topk)
        parents = torch.arange(-1, topk, device=topk_p.device).unsqueeze(0).expand(batch, -1)  # [B, topk+1]
        return input_ids, parent_rows, topk_p, (topk_p.unsqueeze(1), topk_index, parents)
    batch = scores.shape[0]
    expand = scores.unsqueeze(2) * topk_p.view(batch, topk, topk)  # [B, topk, topk]
    best_p, best_i = expand.flatten(1).topk(topk, dim=-1)  # [B, topk]
    children = topk_index.view(batch, topk * topk)
    input_ids = children.gather(1, best_i).flatten()
    parent_rows = (best_i // topk + torch.arange(batch, device=best_i.device).unsqueeze(1) * topk).flatten()
    parents = best_i + topk * topk * (step - 1) + topk
    return input_ids, parent_rows, best_p, (expand, children, parents)


def organize(score_list, token_list, parents_list, num_draft_tokens: int):
    """-> parent_list [B, P], selected_index [B, N-1] (sorted score-space ids), draft tokens [B, N-1]."""
    scores = torch.cat([s.flatten(1) for s in score_list], dim=1)  # [B, S]
    tokens = torch.cat(token_list, dim=1)  # [B, S]
    selected = scores.topk(num_draft_tokens - 1, dim=-1).indices.sort(dim=-1).values
    draft_tokens = tokens.gather(1, selected)
    if len(parents_list) > 1:
        parent_list = torch.cat(parents_list[:-1], dim=1)
    else:
        parent_list = torch.full((scores.shape[0], 1), -1, dtype=torch.int64, device=scores.device)
    return parent_list.contiguous(), selected.contiguous(), draft_tokens


def max_draft_tokens(num_steps: int, topk: int) -> int:
    return 1 + topk + (num_steps - 1) * topk * topk
