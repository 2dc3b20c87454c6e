"""EAGLE tree ops: build the verification tree, then accept a path greedily or by tree rejection sampling.

Encoding (SGLang's): a request's tree has N = num_draft_tokens nodes, node 0 being the root (the last verified
token) and nodes 1..N-1 the selected draft tokens in selection order. `retrive_index[b, i] = b * N + i` is node i's
row in the flattened [B * N] verify batch; `retrive_next_token[b, i]` is i's first child and
`retrive_next_sibling[b, i]` the next child of i's parent (both local node indices, -1 = none). Children are
listed in increasing node order.

Outputs of the verify ops (also SGLang's): `predicts` [B * N] int32, where predicts[retrive_index[b, i]] is the
token committed after node i of the accepted path (the next accepted draft token, or for the last accepted node
the bonus token from the target); `accept_index` [B, num_speculative_tokens] int32, the accepted path's flattened
indices starting with the root, -1 padded; `accept_length` [B] int32, the number of accepted draft tokens (the
bonus token not counted). Entries of `predicts` off the accepted path are 0.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from kernels._common import INDEX_DTYPES, check_out, check_tensor, next_pow2


# --------------------------------------------------------------------------------------------------- build_tree
@triton.jit
def _build_tree_kernel(
    parent_list_ptr,
    selected_index_ptr,
    seq_lens_ptr,
    tree_mask_ptr,
    positions_ptr,
    retrive_index_ptr,
    retrive_next_token_ptr,
    retrive_next_sibling_ptr,
    stride_parent,
    stride_selected,
    NUM_PARENTS: tl.constexpr,
    TOPK: tl.constexpr,
    DEPTH: tl.constexpr,
    N: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int64)
    node = tl.arange(0, BLOCK_N)  # i, one per tree node (0 = root)
    is_node = node < N
    is_draft = is_node & (node > 0)

    # selected_index[b, i - 1] is node i's index in the flattened draft-score list; // TOPK gives its parent's
    # index in parent_list (0 = the root's expansion), parent_list[b, k] the parent's own score-list index.
    selected = tl.load(selected_index_ptr + b * stride_selected + node - 1, mask=is_draft, other=-1)  # [BLOCK_N]
    parent_slot = selected // TOPK
    parent_score_idx = tl.load(
        parent_list_ptr + b * stride_parent + parent_slot,
        mask=is_draft & (parent_slot > 0) & (parent_slot < NUM_PARENTS),
        other=-2,
    )
    # The parent is the first node whose selected index equals parent_score_idx.
    match = (selected[None, :] == parent_score_idx[:, None]) & is_draft[None, :]  # [i, j]
    first = tl.min(tl.where(match, node[None, :], BLOCK_N), axis=1)
    parent = tl.where(parent_slot == 0, 0, tl.where(first < BLOCK_N, first, -1))
    parent = tl.where(is_draft, parent, -1)  # [BLOCK_N]; -1: root, padding, or a node whose parent was not selected

    # first child of p: smallest i with parent i == p; next sibling of i: smallest j > i with the same parent.
    child = (parent[None, :] == node[:, None]) & is_draft[None, :]  # [p, i]
    next_token = tl.min(tl.where(child, node[None, :], BLOCK_N), axis=1)
    next_token = tl.where(next_token < BLOCK_N, next_token, -1)
    sibling = (parent[None, :] == parent[:, None]) & (node[None, :] > node[:, None]) & (parent[:, None] >= 0)
    sibling = sibling & is_draft[None, :]  # [i, j]
    next_sibling = tl.min(tl.where(sibling, node[None, :], BLOCK_N), axis=1)
    next_sibling = tl.where(next_sibling < BLOCK_N, next_sibling, -1)

    # Ancestor-or-self mask by walking DEPTH parent hops; the root is visible to every node.
    visible = (node[:, None] == node[None, :]) | (node[None, :] == 0)  # [i, j]
    hop = parent
    for _ in tl.static_range(DEPTH):
        visible = visible | ((node[None, :] == hop[:, None]) & (hop[:, None] >= 0))
        hop_onehot = node[None, :] == hop[:, None]  # [i, k]: k is i's current ancestor
        hop = tl.sum(tl.where(hop_onehot, parent[None, :] + 1, 0), axis=1) - 1
    depth = tl.sum(visible.to(tl.int32), axis=1) - 1

    row = b * N
    pair = node[:, None] * N + node[None, :]
    tl.store(tree_mask_ptr + row * N + pair, visible.to(tl.int8), mask=is_node[:, None] & is_node[None, :])
    tl.store(positions_ptr + row + node, seq_len + tl.where(node == 0, 0, depth), mask=is_node)
    tl.store(retrive_index_ptr + row + node, row + node, mask=is_node)
    tl.store(retrive_next_token_ptr + row + node, next_token, mask=is_node)
    tl.store(retrive_next_sibling_ptr + row + node, next_sibling, mask=is_node)


def build_tree(
    parent_list: torch.Tensor,
    selected_index: torch.Tensor,
    seq_lens: torch.Tensor,
    topk: int,
    depth: int,
    num_draft_tokens: int,
    out: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tree structure of each request's draft tokens (SGLang's build_tree_kernel_efficient, q-len-only mask).

    parent_list [B, topk * (depth - 1) + 1] int64: score-list index of each expanded node (entry 0: the root);
    selected_index [B, N - 1] int64: sorted score-list indices of the selected draft tokens; seq_lens [B]: verified
    lengths. Returns tree_mask bool [B, N, N] (node i sees j iff j is i, an ancestor of i, or the root),
    positions [B, N] int64 (seq_len + depth), retrive_index, retrive_next_token, retrive_next_sibling [B, N] int64.
    `out` optionally gives those five buffers.
    """
    n = num_draft_tokens
    if n < 1 or topk < 1 or depth < 1:
        raise ValueError(f"topk, depth and num_draft_tokens must be >= 1, got {topk}, {depth}, {n}")
    check_tensor("selected_index", selected_index, ndim=2, dtypes=(torch.int64,), last_dim_contiguous=True)
    batch, device = selected_index.shape[0], selected_index.device
    check_tensor("selected_index", selected_index, shape=(batch, n - 1))
    check_tensor(
        "parent_list", parent_list, ndim=2, dtypes=(torch.int64,), shape=(batch, None), device=device,
        last_dim_contiguous=True,
    )  # fmt: skip
    if depth > 1 and parent_list.shape[1] < 1:
        raise ValueError("parent_list must hold at least the root entry when depth > 1")
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, shape=(batch,), device=device)
    shapes = [(batch, n, n), (batch, n), (batch, n), (batch, n), (batch, n)]
    dtypes = [torch.bool, torch.int64, torch.int64, torch.int64, torch.int64]
    names = ["tree_mask", "positions", "retrive_index", "retrive_next_token", "retrive_next_sibling"]
    if out is None:
        out = tuple(torch.empty(s, dtype=d, device=device) for s, d in zip(shapes, dtypes))
    else:
        if len(out) != 5:
            raise ValueError(f"out must hold 5 tensors ({', '.join(names)}), got {len(out)}")
        for name, t, s, d in zip(names, out, shapes, dtypes):
            check_out(f"out[{name}]", t, s, d, device)
            if not t.is_contiguous():
                raise ValueError(f"out[{name}] must be contiguous")
    if batch == 0:
        return out
    tree_mask, positions, retrive_index, retrive_next_token, retrive_next_sibling = out
    _build_tree_kernel[(batch,)](
        parent_list,
        selected_index,
        seq_lens.contiguous(),
        tree_mask.view(torch.int8),
        positions,
        retrive_index,
        retrive_next_token,
        retrive_next_sibling,
        parent_list.stride(0),
        selected_index.stride(0),
        NUM_PARENTS=parent_list.shape[1],
        TOPK=topk,
        DEPTH=depth,
        N=n,
        BLOCK_N=max(2, next_pow2(n)),
    )
    return out


def build_tree_ref(
    parent_list: torch.Tensor,
    selected_index: torch.Tensor,
    seq_lens: torch.Tensor,
    topk: int,
    depth: int,
    num_draft_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-Python build_tree (same outputs as `build_tree`)."""
    n = num_draft_tokens
    batch = selected_index.shape[0]
    device = selected_index.device
    tree_mask = torch.zeros(batch, n, n, dtype=torch.bool)
    positions = torch.zeros(batch, n, dtype=torch.int64)
    retrive_index = torch.arange(batch * n, dtype=torch.int64).view(batch, n)
    next_token = torch.full((batch, n), -1, dtype=torch.int64)
    next_sibling = torch.full((batch, n), -1, dtype=torch.int64)
    for b in range(batch):
        selected = selected_index[b].tolist()
        parent = [-1] * n
        for i in range(1, n):
            slot = selected[i - 1] // topk
            if slot == 0:
                parent[i] = 0
            else:
                target = int(parent_list[b, slot])
                parent[i] = next((j + 1 for j, s in enumerate(selected) if s == target), -1)
        for i in range(n - 1, 0, -1):  # inserting at the head in reverse order lists children in increasing order
            p = parent[i]
            if p < 0:
                continue
            next_sibling[b, i] = next_token[b, p]
            next_token[b, p] = i
        for i in range(n):
            tree_mask[b, i, i] = tree_mask[b, i, 0] = True
            a, steps = parent[i], 0
            while a >= 0 and steps < depth:
                tree_mask[b, i, a] = True
                a, steps = parent[a], steps + 1
            positions[b, i] = int(seq_lens[b]) + (int(tree_mask[b, i].sum()) - 1 if i > 0 else 0)
    return tuple(t.to(device) for t in (tree_mask, positions, retrive_index, next_token, next_sibling))


# ------------------------------------------------------------------------------------------ shared verify checks
def _check_tree(
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    num_speculative_tokens: int,
):
    check_tensor("candidates", candidates, ndim=2, dtypes=(torch.int64, torch.int32))
    batch, n = candidates.shape
    for name, t in (
        ("retrive_index", retrive_index),
        ("retrive_next_token", retrive_next_token),
        ("retrive_next_sibling", retrive_next_sibling),
    ):
        check_tensor(name, t, ndim=2, dtypes=(torch.int64, torch.int32), shape=(batch, n), device=candidates.device)
    if not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens must be a python int >= 1, got {num_speculative_tokens!r}")
    return batch, n


def _verify_outputs(out, batch: int, n: int, num_spec: int, device: torch.device):
    if out is None:
        return (
            torch.empty(batch * n, dtype=torch.int32, device=device),
            torch.empty(batch, num_spec, dtype=torch.int32, device=device),
            torch.empty(batch, dtype=torch.int32, device=device),
        )
    if len(out) != 3:
        raise ValueError(f"out must hold 3 tensors (predicts, accept_index, accept_length), got {len(out)}")
    for name, t, shape in zip(
        ("predicts", "accept_index", "accept_length"), out, ((batch * n,), (batch, num_spec), (batch,))
    ):
        check_out(f"out[{name}]", t, shape, torch.int32, device)
        if not t.is_contiguous():
            raise ValueError(f"out[{name}] must be contiguous")
    return tuple(out)


# ------------------------------------------------------------------------------------------- verify_tree_greedy
@triton.jit
def _verify_tree_greedy_kernel(
    predicts_ptr,
    accept_index_ptr,
    accept_length_ptr,
    candidates_ptr,
    retrive_index_ptr,
    retrive_next_token_ptr,
    retrive_next_sibling_ptr,
    target_predict_ptr,
    N: tl.constexpr,
    NUM_SPEC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    row = b * N
    offs_n = tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, BLOCK_S)

    last = tl.load(retrive_index_ptr + row).to(tl.int64)  # flattened index of the last accepted node
    accept = tl.where(offs_s == 0, last, -1)  # [BLOCK_S]
    predicts = tl.zeros([BLOCK_N], dtype=tl.int64)  # this request's rows of predicts
    num_accepted = tl.zeros([], dtype=tl.int32)
    cur = last * 0  # local index of the node whose children are being tried
    active = num_accepted == 0
    for _ in range(1, NUM_SPEC):
        if active:
            cur = tl.load(retrive_next_token_ptr + row + cur).to(tl.int64)
            found = num_accepted * 0
            while (cur != -1) & (found == 0):
                draft_index = tl.load(retrive_index_ptr + row + cur).to(tl.int64)
                draft_token = tl.load(candidates_ptr + row + cur).to(tl.int64)
                target_token = tl.load(target_predict_ptr + last).to(tl.int64)
                if draft_token == target_token:
                    predicts = tl.where(offs_n == last - row, target_token, predicts)
                    num_accepted += 1
                    accept = tl.where(offs_s == num_accepted, draft_index, accept)
                    last = draft_index
                    found += 1
                else:
                    cur = tl.load(retrive_next_sibling_ptr + row + cur).to(tl.int64)
            active = cur != -1
    bonus = tl.load(target_predict_ptr + last).to(tl.int64)
    predicts = tl.where(offs_n == last - row, bonus, predicts)
    tl.store(predicts_ptr + row + offs_n, predicts.to(tl.int32), mask=offs_n < N)
    tl.store(accept_index_ptr + b * NUM_SPEC + offs_s, accept.to(tl.int32), mask=offs_s < NUM_SPEC)
    tl.store(accept_length_ptr + b, num_accepted)


def verify_tree_greedy(
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_predict: torch.Tensor,
    num_speculative_tokens: int,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy tree verification (temperature 0): follow the child whose token equals the target's argmax.

    candidates [B, N] (node i's token; node 0 the last verified token); retrive_* [B, N] from `build_tree`;
    target_predict [B, N] the target's argmax after each node; num_speculative_tokens = depth + 1.
    Returns (predicts [B * N], accept_index [B, num_speculative_tokens], accept_length [B]), all int32; see the
    module docstring. Requires the standard retrive_index (b * N + i).
    """
    batch, n = _check_tree(candidates, retrive_index, retrive_next_token, retrive_next_sibling, num_speculative_tokens)
    check_tensor("target_predict", target_predict, ndim=2, dtypes=INDEX_DTYPES, shape=(batch, n))
    tensors = [t.contiguous() for t in (candidates, retrive_index, retrive_next_token, retrive_next_sibling)]
    predicts, accept_index, accept_length = _verify_outputs(out, batch, n, num_speculative_tokens, candidates.device)
    if batch == 0:
        return predicts, accept_index, accept_length
    _verify_tree_greedy_kernel[(batch,)](
        predicts,
        accept_index,
        accept_length,
        *tensors,
        target_predict.contiguous(),
        N=n,
        NUM_SPEC=num_speculative_tokens,
        BLOCK_N=max(2, next_pow2(n)),
        BLOCK_S=max(2, next_pow2(num_speculative_tokens)),
    )
    return predicts, accept_index, accept_length


def verify_tree_greedy_ref(
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_predict: torch.Tensor,
    num_speculative_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, n = candidates.shape
    flat_target = target_predict.reshape(-1).tolist()
    predicts = torch.zeros(batch * n, dtype=torch.int32)
    accept_index = torch.full((batch, num_speculative_tokens), -1, dtype=torch.int32)
    accept_length = torch.zeros(batch, dtype=torch.int32)
    for b in range(batch):
        last = int(retrive_index[b, 0])
        accept_index[b, 0] = last
        cur, num_accepted = 0, 0
        for _ in range(1, num_speculative_tokens):
            cur = int(retrive_next_token[b, cur])
            while cur != -1:
                if int(candidates[b, cur]) == flat_target[last]:
                    predicts[last] = flat_target[last]
                    num_accepted += 1
                    accept_index[b, num_accepted] = last = int(retrive_index[b, cur])
                    break
                cur = int(retrive_next_sibling[b, cur])
            if cur == -1:
                break
        accept_length[b] = num_accepted
        predicts[last] = flat_target[last]
    device = candidates.device
    return predicts.to(device), accept_index.to(device), accept_length.to(device)


# ------------------------------------------------------------------------------------ tree_speculative_sampling
@triton.jit
def _tree_speculative_sampling_kernel(
    predicts_ptr,
    accept_index_ptr,
    accept_length_ptr,
    candidates_ptr,
    retrive_index_ptr,
    retrive_next_token_ptr,
    retrive_next_sibling_ptr,
    uniform_samples_ptr,
    uniform_final_ptr,
    target_probs_ptr,
    draft_probs_ptr,
    threshold_single,
    threshold_acc,
    N: tl.constexpr,
    NUM_SPEC: tl.constexpr,
    VOCAB: tl.constexpr,
    HAS_DRAFT_PROBS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    row = b * N
    offs_n = tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, BLOCK_S)

    last = tl.load(retrive_index_ptr + row).to(tl.int64)
    accept = tl.where(offs_s == 0, last, -1)  # [BLOCK_S]
    predicts = tl.zeros([BLOCK_N], dtype=tl.int64)
    rejected = tl.full([BLOCK_N], -1, dtype=tl.int64)  # tokens of the current node's rejected children, by node
    num_accepted = tl.zeros([], dtype=tl.int32)
    cur = last * 0
    prob_node = last * 0  # local index of the node whose target distribution is in use
    coin = tl.load(uniform_samples_ptr + row)
    prob_acc = coin * 0.0
    active = num_accepted == 0
    for _ in range(1, NUM_SPEC):
        if active:
            cur = tl.load(retrive_next_token_ptr + row + cur).to(tl.int64)
            found = num_accepted * 0
            while (cur != -1) & (found == 0):
                draft_index = tl.load(retrive_index_ptr + row + cur).to(tl.int64)
                draft_token = tl.load(candidates_ptr + row + cur).to(tl.int64)
                p_single = tl.load(target_probs_ptr + (row + prob_node) * VOCAB + draft_token)
                prob_acc += p_single
                # Sibling k is accepted iff the coin falls in its slice of the target CDF over the siblings.
                if (coin <= prob_acc / threshold_acc) | (p_single >= threshold_single):
                    prob_acc = coin * 0.0
                    prob_node = cur
                    coin = tl.load(uniform_samples_ptr + row + cur)
                    predicts = tl.where(offs_n == last - row, draft_token, predicts)
                    rejected = tl.full([BLOCK_N], -1, dtype=tl.int64)
                    num_accepted += 1
                    accept = tl.where(offs_s == num_accepted, draft_index, accept)
                    last = draft_index
                    found += 1
                else:
                    rejected = tl.where(offs_n == cur, draft_token, rejected)
                    cur = tl.load(retrive_next_sibling_ptr + row + cur).to(tl.int64)
            active = cur != -1

    # Bonus / correction token from relu(p - q) at the last accepted node, the rejected children's mass removed;
    # q is ignored when the path reached full depth (no draft distribution for the bonus token).
    use_draft = num_accepted != NUM_SPEC - 1
    probs_row = (row + prob_node) * VOCAB
    total = coin * 0.0
    for v0 in range(0, VOCAB, BLOCK_V):
        residual = _residual_block(
            target_probs_ptr, draft_probs_ptr, probs_row, v0, rejected, use_draft, VOCAB, HAS_DRAFT_PROBS, BLOCK_V
        )
        total += tl.sum(residual, 0)
    u = tl.load(uniform_final_ptr + b) * total
    running = total * 0.0
    sampled = tl.zeros([], dtype=tl.int64) + VOCAB
    last_valid = tl.zeros([], dtype=tl.int64) - 1
    v0 = tl.zeros([], dtype=tl.int64)
    while (v0 < VOCAB) & (sampled == VOCAB):
        residual = _residual_block(
            target_probs_ptr, draft_probs_ptr, probs_row, v0, rejected, use_draft, VOCAB, HAS_DRAFT_PROBS, BLOCK_V
        )
        offs_v = v0 + tl.arange(0, BLOCK_V)
        cdf = running + tl.cumsum(residual, 0)
        hit = (cdf > u) & (residual > 0.0)
        first = tl.min(tl.where(hit, offs_v, VOCAB), 0)
        sampled = tl.minimum(sampled, first)
        last_valid = tl.maximum(last_valid, tl.max(tl.where(residual > 0.0, offs_v, -1), 0))
        running += tl.sum(residual, 0)
        v0 += BLOCK_V
    # u at the very top of the CDF can miss by rounding: fall back to the last token with mass.
    sampled = tl.where(sampled == VOCAB, tl.where(last_valid >= 0, last_valid, VOCAB - 1), sampled)
    predicts = tl.where(offs_n == last - row, sampled, predicts)

    tl.store(predicts_ptr + row + offs_n, predicts.to(tl.int32), mask=offs_n < N)
    tl.store(accept_index_ptr + b * NUM_SPEC + offs_s, accept.to(tl.int32), mask=offs_s < NUM_SPEC)
    tl.store(accept_length_ptr + b, num_accepted)


@triton.jit
def _residual_block(
    target_probs_ptr,
    draft_probs_ptr,
    probs_row,
    v0,
    rejected,
    use_draft,
    VOCAB: tl.constexpr,
    HAS_DRAFT_PROBS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """relu(p - q) over tokens v0..v0+BLOCK_V, zero at the rejected tokens [BLOCK_N] and past the vocabulary."""
    offs_v = v0 + tl.arange(0, BLOCK_V)
    mask_v = offs_v < VOCAB
    p = tl.load(target_probs_ptr + probs_row + offs_v, mask=mask_v, other=0.0)
    if HAS_DRAFT_PROBS:
        q = tl.load(draft_probs_ptr + probs_row + offs_v, mask=mask_v & use_draft, other=0.0)
        residual = tl.maximum(p - q, 0.0)
    else:
        residual = p
    # Scatter the rejected tokens into this block's bins: O(BLOCK_N), not an O(BLOCK_V * BLOCK_N) comparison.
    in_block = (rejected >= v0) & (rejected < v0 + BLOCK_V)
    rejected_hits = tl.histogram((rejected - v0).to(tl.int32), BLOCK_V, mask=in_block)  # [BLOCK_V]
    return tl.where(rejected_hits > 0, 0.0, residual)


def tree_speculative_sampling(
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    uniform_samples: torch.Tensor,
    uniform_samples_for_final_sampling: torch.Tensor,
    num_speculative_tokens: int,
    threshold_single: float = 1.0,
    threshold_acc: float = 1.0,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tree rejection sampling, as SGLang's tree_speculative_sampling_target_only.

    At each accepted node, with coin u = uniform_samples[b, node], the children c_1, c_2, ... (in sibling order)
    are tried in turn and c_k is accepted iff u <= (p(c_1) + ... + p(c_k)) / threshold_acc or
    p(c_k) >= threshold_single, p being the target distribution at that node. With both thresholds 1.0 this is
    rejection sampling against a deterministic draft (EAGLE picks children by top-k, so the draft "distribution"
    of each try is a point mass on c_k): c_k is accepted with probability min(1, p'(c_k) / 1), p' being p with the
    already rejected siblings removed and renormalised (the residual max(p' - delta(c), 0)), so overall exactly
    with probability p(c_k). When every child is rejected, the correction token is drawn (coin
    uniform_samples_for_final_sampling[b]) from relu(p - q) with the rejected children removed, which for q = 0 is
    p conditioned on not being one of them. So with draft_probs None (or zeros, as SGLang passes it) each
    committed token is distributed exactly as the target's, whatever tokens the tree holds. A nonzero draft_probs
    is subtracted as SGLang's formula does, which is not lossless for top-k-built trees. At full depth the bonus
    token is drawn from p.

    candidates [B, N]; retrive_* [B, N]; draft_probs None or [B, N, V] fp32; target_probs [B, N, V] fp32 (row i =
    target distribution after node i); uniform_samples [B, N], uniform_samples_for_final_sampling [B] fp32 in [0, 1).
    Returns (predicts [B * N], accept_index [B, num_speculative_tokens], accept_length [B]), int32.
    """
    batch, n = _check_tree(candidates, retrive_index, retrive_next_token, retrive_next_sibling, num_speculative_tokens)
    device = candidates.device
    check_tensor("target_probs", target_probs, ndim=3, dtypes=(torch.float32,), shape=(batch, n, None), device=device)
    vocab = target_probs.shape[2]
    if draft_probs is not None:
        check_tensor(
            "draft_probs", draft_probs, ndim=3, dtypes=(torch.float32,), shape=(batch, n, vocab), device=device
        )
    check_tensor("uniform_samples", uniform_samples, ndim=2, dtypes=(torch.float32,), shape=(batch, n), device=device)
    check_tensor(
        "uniform_samples_for_final_sampling", uniform_samples_for_final_sampling, ndim=1, dtypes=(torch.float32,),
        shape=(batch,), device=device,
    )  # fmt: skip
    predicts, accept_index, accept_length = _verify_outputs(out, batch, n, num_speculative_tokens, device)
    if batch == 0:
        return predicts, accept_index, accept_length
    tensors = [t.contiguous() for t in (candidates, retrive_index, retrive_next_token, retrive_next_sibling)]
    target_probs = target_probs.contiguous()
    _tree_speculative_sampling_kernel[(batch,)](
        predicts,
        accept_index,
        accept_length,
        *tensors,
        uniform_samples.contiguous(),
        uniform_samples_for_final_sampling.contiguous(),
        target_probs,
        draft_probs.contiguous() if draft_probs is not None else target_probs,
        float(threshold_single),
        max(float(threshold_acc), 1e-9),
        N=n,
        NUM_SPEC=num_speculative_tokens,
        VOCAB=vocab,
        HAS_DRAFT_PROBS=draft_probs is not None,
        BLOCK_N=max(2, next_pow2(n)),
        BLOCK_S=max(2, next_pow2(num_speculative_tokens)),
        BLOCK_V=min(1024, next_pow2(vocab)),
    )
    return predicts, accept_index, accept_length


def _f32(x: float) -> float:
    """Round a Python float to fp32, so that scalar sums and quotients round as in the kernel."""
    return struct.unpack("f", struct.pack("f", x))[0]


def tree_speculative_sampling_ref(
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    uniform_samples: torch.Tensor,
    uniform_samples_for_final_sampling: torch.Tensor,
    num_speculative_tokens: int,
    threshold_single: float = 1.0,
    threshold_acc: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-Python tree rejection sampling (same outputs as `tree_speculative_sampling`), fp32 arithmetic."""
    batch, n = candidates.shape
    vocab = target_probs.shape[2]
    target = target_probs.detach().float().cpu()
    draft = draft_probs.detach().float().cpu() if draft_probs is not None else None
    target_list = target.tolist()
    coins = uniform_samples.detach().float().cpu().tolist()
    final_coins = uniform_samples_for_final_sampling.detach().float().cpu()
    cand, ridx = candidates.tolist(), retrive_index.tolist()
    next_token, next_sibling = retrive_next_token.tolist(), retrive_next_sibling.tolist()
    th_single, th_acc = _f32(threshold_single), _f32(max(float(threshold_acc), 1e-9))
    predicts = [0] * (batch * n)
    accept_index = [[-1] * num_speculative_tokens for _ in range(batch)]
    accept_length = [0] * batch
    final_node = [0] * batch  # local node whose distribution gives the last token
    final_row = [0] * batch  # its flattened index
    rejected_b: list[int] = []
    rejected_tokens: list[int] = []
    for b in range(batch):
        last = ridx[b][0]
        path = [last]
        cur, prob_node, num_accepted = 0, 0, 0
        coin, prob_acc = coins[b][0], 0.0
        rejected: list[int] = []
        for _ in range(1, num_speculative_tokens):
            cur = next_token[b][cur]
            while cur != -1:
                token = cand[b][cur]
                p_single = target_list[b][prob_node][token]
                prob_acc = _f32(prob_acc + p_single)
                if coin <= _f32(prob_acc / th_acc) or p_single >= th_single:
                    prob_acc = 0.0
                    prob_node, coin, rejected = cur, coins[b][cur], []
                    predicts[last] = token
                    num_accepted += 1
                    last = ridx[b][cur]
                    path.append(last)
                    break
                rejected.append(token)
                cur = next_sibling[b][cur]
            if cur == -1:
                break
        accept_index[b][: len(path)] = path
        accept_length[b] = num_accepted
        final_node[b], final_row[b] = prob_node, last
        rejected_b.extend([b] * len(rejected))
        rejected_tokens.extend(rejected)

    # Correction / bonus token of every request at once: relu(p - q) at its last accepted node.
    predicts = torch.tensor(predicts, dtype=torch.int32)
    accept_index = torch.tensor(accept_index, dtype=torch.int32).view(batch, num_speculative_tokens)
    accept_length = torch.tensor(accept_length, dtype=torch.int32)
    final_node, final_row = torch.tensor(final_node), torch.tensor(final_row)
    rows = torch.arange(batch)
    residual = target[rows, final_node]  # [B, V]
    if draft is not None:
        use_draft = (accept_length != num_speculative_tokens - 1)[:, None]
        residual = torch.where(use_draft, (residual - draft[rows, final_node]).clamp_min(0.0), residual)
    residual[rejected_b, rejected_tokens] = 0.0
    u = final_coins * residual.sum(-1)  # [B]
    hit = (residual.cumsum(-1) > u[:, None]) & (residual > 0)
    vocab_ids = torch.arange(vocab)
    first_hit = torch.where(hit, vocab_ids, vocab).min(-1).values
    last_valid = torch.where(residual > 0, vocab_ids, -1).max(-1).values
    fallback = torch.where(last_valid >= 0, last_valid, vocab - 1)
    predicts[final_row] = torch.where(first_hit < vocab, first_hit, fallback).to(torch.int32)
    device = candidates.device
    return predicts.to(device), accept_index.to(device), accept_length.to(device)
