import pytest
import torch

from kernels.speculative import (
    build_tree,
    build_tree_ref,
    tree_speculative_sampling,
    tree_speculative_sampling_ref,
    verify_tree_greedy,
    verify_tree_greedy_ref,
)
from tests.kernels.paged import DEVICE, to_device

# A batch of two EAGLE trees (topk 4, depth 4, 8 draft tokens) whose expected encoding is known from SGLang's own
# build_tree test: parent_list = concatenated parents of draft steps 0..2, selected_index = sorted top-7 indices of
# the flattened draft scores.
SGL_PARENT_LIST = torch.tensor(
    [[-1, 0, 1, 2, 3, 4, 8, 9, 10, 20, 24, 21, 28], [-1, 0, 1, 2, 3, 4, 5, 6, 7, 24, 28, 20, 21]]
)
SGL_SELECTED_INDEX = torch.tensor([[0, 1, 4, 8, 20, 24, 36], [0, 4, 5, 6, 7, 24, 36]])
SGL_SEQ_LENS = torch.tensor([5, 10])


def _assert_all_equal(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g.cpu(), w.cpu()), (g, w)


def _on_device(fn, *args, **kwargs):
    """fn (a kernel or its reference) run on DEVICE copies of the tensor arguments; its outputs back on the CPU."""
    out = fn(*to_device(args), **kwargs)
    assert all(t.device.type == DEVICE.type for t in out)
    return tuple(t.cpu() for t in out)


def test_build_tree_matches_known_sglang_encoding():
    out = _on_device(build_tree, SGL_PARENT_LIST, SGL_SELECTED_INDEX, SGL_SEQ_LENS, topk=4, depth=4, num_draft_tokens=8)
    tree_mask, positions, retrive_index, next_token, next_sibling = out
    assert positions.flatten().tolist() == [5, 6, 6, 7, 7, 8, 8, 9, 10, 11, 12, 12, 12, 12, 13, 14]
    assert retrive_index.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]]
    assert next_token.tolist() == [[1, 3, 4, 5, 6, 7, -1, -1], [1, 2, -1, 6, -1, -1, 7, -1]]
    assert next_sibling.tolist() == [[-1, 2, -1, -1, -1, -1, -1, -1], [-1, -1, 3, 4, 5, -1, -1, -1]]
    # Request 0 is two chains under the root: 1-3-5-7 and 2-4-6.
    assert tree_mask[0, 7].nonzero().flatten().tolist() == [0, 1, 3, 5, 7]
    assert tree_mask[0, 6].nonzero().flatten().tolist() == [0, 2, 4, 6]
    assert tree_mask[1, 7].nonzero().flatten().tolist() == [0, 1, 3, 6, 7]
    assert tree_mask[1, 0].nonzero().flatten().tolist() == [0]
    _assert_all_equal(out, build_tree_ref(SGL_PARENT_LIST, SGL_SELECTED_INDEX, SGL_SEQ_LENS, 4, 4, 8))


def random_eagle_tree_inputs(batch, topk, depth, num_draft_tokens, gen):
    """parent_list and selected_index as EAGLE's draft loop makes them: each step expands the topk best candidates
    of the previous step, and the N - 1 best cumulative scores (a child never beats its parent) are selected."""
    parent_lists, selected = [], []
    for _ in range(batch):
        scores = torch.rand(topk, generator=gen)  # step 0 candidates: flat indices 0..topk-1
        flat_scores = [scores]
        parents = [torch.cat([torch.tensor([-1]), torch.arange(topk)])]
        prev_idx, prev_scores = torch.arange(topk), scores
        for step in range(1, depth):
            if step == 1:
                expand = torch.arange(topk)  # step 0 has exactly topk candidates: all expanded (parents[0])
            else:
                expand = torch.randperm(len(prev_idx), generator=gen)[:topk]  # any subset, not only the best
                parents.append(prev_idx[expand])
            child_scores = prev_scores[expand, None] * torch.rand(topk, topk, generator=gen)  # [topk, topk]
            flat_scores.append(child_scores.flatten())
            prev_idx = topk + (step - 1) * topk * topk + torch.arange(topk * topk)
            prev_scores = child_scores.flatten()
        all_scores = torch.cat(flat_scores)
        sel = torch.sort(torch.topk(all_scores, num_draft_tokens - 1).indices).values
        parent_lists.append(torch.cat(parents) if depth > 1 else torch.tensor([-1]))
        selected.append(sel)
    return torch.stack(parent_lists), torch.stack(selected)


@pytest.mark.parametrize("topk,depth,num_draft_tokens", [(1, 3, 4), (4, 4, 8), (8, 5, 24), (2, 6, 12)])
def test_build_tree_matches_reference_on_random_trees(topk, depth, num_draft_tokens):
    gen = torch.Generator().manual_seed(topk * 100 + depth)
    parent_list, selected_index = random_eagle_tree_inputs(3, topk, depth, num_draft_tokens, gen)
    seq_lens = torch.tensor([3, 17, 100])
    out = _on_device(build_tree, parent_list, selected_index, seq_lens, topk, depth, num_draft_tokens)
    ref = build_tree_ref(parent_list, selected_index, seq_lens, topk, depth, num_draft_tokens)
    _assert_all_equal(out, ref)
    tree_mask, positions = out[0], out[1]
    # Every node is reachable from the root and its depth is its number of proper ancestors.
    assert (positions - seq_lens[:, None]).max() <= depth
    assert torch.equal(positions - seq_lens[:, None], tree_mask.sum(-1) - 1)
    assert parent_list.shape[1] == topk * (depth - 1) + 1


def test_build_tree_out_buffers_and_bad_arguments():
    bufs = (
        torch.empty(2, 8, 8, dtype=torch.bool, device=DEVICE),
        *(torch.full((2, 8), 7, dtype=torch.int64, device=DEVICE) for _ in range(4)),
    )
    parent_list, selected_index, seq_lens = to_device((SGL_PARENT_LIST, SGL_SELECTED_INDEX, SGL_SEQ_LENS))
    out = build_tree(parent_list, selected_index, seq_lens, 4, 4, 8, out=bufs)
    assert all(a is b for a, b in zip(out, bufs))
    _assert_all_equal(out, build_tree_ref(SGL_PARENT_LIST, SGL_SELECTED_INDEX, SGL_SEQ_LENS, 4, 4, 8))
    with pytest.raises(ValueError, match="selected_index"):
        build_tree(parent_list, selected_index, seq_lens, 4, 4, 9)
    with pytest.raises(ValueError, match="parent_list"):
        build_tree(parent_list.int(), selected_index, seq_lens, 4, 4, 8)


# Hand-built tree (the first SGLang tree): root -> {1, 2}; 1 -> 3 -> 5 -> 7; 2 -> 4 -> 6.
HAND_NEXT_TOKEN = torch.tensor([[1, 3, 4, 5, 6, 7, -1, -1]])
HAND_NEXT_SIBLING = torch.tensor([[-1, 2, -1, -1, -1, -1, -1, -1]])
HAND_CANDIDATES = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17]])


def _hand_tree(batch=1):
    n = 8
    return (
        HAND_CANDIDATES.repeat(batch, 1),
        torch.arange(batch * n).view(batch, n),
        HAND_NEXT_TOKEN.repeat(batch, 1),
        HAND_NEXT_SIBLING.repeat(batch, 1),
    )


@pytest.mark.parametrize("impl", [verify_tree_greedy, verify_tree_greedy_ref])
def test_verify_tree_greedy_hand_built_tree(impl):
    tree = _hand_tree(3)
    target_predict = torch.tensor(
        [
            [12, 0, 14, 0, 99, 0, 0, 0],  # root picks node 2 (second sibling), then 4; node 6 (16) is rejected
            [11, 13, 0, 15, 0, 17, 0, 42],  # whole chain 1-3-5-7, but num_speculative_tokens=4 caps it at 3
            [55, 0, 0, 0, 0, 0, 0, 0],  # no child matches: only the bonus token
        ]
    )
    predicts, accept_index, accept_length = _on_device(impl, *tree, target_predict, 4)
    assert accept_length.tolist() == [2, 3, 0]
    assert accept_index.tolist() == [[0, 2, 4, -1], [8, 9, 11, 13], [16, -1, -1, -1]]
    predicts = predicts.view(3, 8)
    assert predicts[0, [0, 2, 4]].tolist() == [12, 14, 99]
    assert predicts[1, [0, 1, 3, 5]].tolist() == [11, 13, 15, 17]  # node 5's bonus is the target's 17
    assert predicts[2, 0].item() == 55
    assert predicts.dtype == accept_index.dtype == accept_length.dtype == torch.int32


def test_verify_tree_greedy_matches_reference_on_random_trees():
    gen = torch.Generator().manual_seed(0)
    batch, topk, depth, n = 16, 4, 5, 12
    parent_list, selected_index = random_eagle_tree_inputs(batch, topk, depth, n, gen)
    _, _, retrive_index, next_token, next_sibling = build_tree_ref(
        parent_list, selected_index, torch.zeros(batch), topk, depth, n
    )
    vocab = 3  # tiny vocabulary so that many draft tokens match
    candidates = torch.randint(0, vocab, (batch, n), generator=gen)
    target_predict = torch.randint(0, vocab, (batch, n), generator=gen)
    args = (candidates, retrive_index, next_token, next_sibling, target_predict, depth + 1)
    got, want = _on_device(verify_tree_greedy, *args), verify_tree_greedy_ref(*args)
    _assert_all_equal(got, want)
    assert want[2].max() >= 2  # the case exercises multi-token acceptance


@pytest.mark.parametrize("impl", [tree_speculative_sampling, tree_speculative_sampling_ref])
def test_tree_speculative_sampling_hand_built_tree(impl):
    """Coins chosen by hand against the target CDFs; vocabulary of 20, tokens 10..17 are the tree's."""
    candidates, retrive_index, next_token, next_sibling = _hand_tree(2)
    vocab = 20
    target = torch.zeros(2, 8, vocab)
    target[:, 0, 11], target[:, 0, 12], target[:, 0, 3] = 0.3, 0.5, 0.2  # root: children 11, 12
    target[:, 2, 14], target[:, 2, 5] = 0.25, 0.75  # node 2: child 14
    target[:, 4, 16], target[:, 4, 7] = 0.5, 0.5  # node 4: child 16
    target[:, 1, 13], target[:, 1, 9] = 0.5, 0.5
    coins = torch.full((2, 8), 0.5)
    coins[0, 0] = 0.6  # 0.6 > 0.3 rejects 11, 0.6 <= 0.3 + 0.5 accepts 12
    coins[0, 2] = 0.1  # 0.1 <= 0.25 accepts 14
    coins[0, 4] = 0.9  # 0.9 > 0.5 rejects 16; node 4's only child is exhausted
    coins[1, 0] = 0.95  # rejects both 11 and 12: correction from p without them, i.e. token 3
    final = torch.tensor([0.7, 0.3])  # request 0: residual at node 4 = {7: 0.5}, so token 7
    predicts, accept_index, accept_length = _on_device(
        impl, candidates, retrive_index, next_token, next_sibling, None, target, coins, final, 5
    )
    assert accept_length.tolist() == [2, 0]
    assert accept_index.tolist() == [[0, 2, 4, -1, -1], [8, -1, -1, -1, -1]]
    predicts = predicts.view(2, 8)
    assert predicts[0, [0, 2, 4]].tolist() == [12, 14, 7]
    assert predicts[1, 0].item() == 3


def _random_sampling_case(batch, vocab, gen, with_draft):
    topk, depth, n = 3, 4, 9
    parent_list, selected_index = random_eagle_tree_inputs(batch, topk, depth, n, gen)
    _, _, retrive_index, next_token, next_sibling = build_tree_ref(
        parent_list, selected_index, torch.zeros(batch), topk, depth, n
    )
    # Peaked targets, with the tree's tokens among the likely ones, so that paths of several tokens are accepted.
    target = torch.softmax(3 * torch.randn(batch, n, vocab, generator=gen), -1)
    parent = torch.zeros(batch, n, dtype=torch.int64)
    for b in range(batch):
        for p in range(n):
            child = int(next_token[b, p])
            while child != -1:
                parent[b, child] = p
                child = int(next_sibling[b, child])
    parent_target = target.gather(1, parent[:, :, None].expand(-1, -1, vocab))  # [B, N, V]: target at the parent
    candidates = torch.multinomial(parent_target.view(-1, vocab), 1, generator=gen).view(batch, n)
    draft = torch.softmax(torch.randn(batch, n, vocab, generator=gen), -1) if with_draft else None
    coins = torch.rand(batch, n, generator=gen)
    final = torch.rand(batch, generator=gen)
    return candidates, retrive_index, next_token, next_sibling, draft, target, coins, final, depth + 1


@pytest.mark.parametrize("with_draft", [False, True])
@pytest.mark.parametrize("thresholds", [(1.0, 1.0), (0.4, 0.7)])
def test_tree_speculative_sampling_matches_reference(with_draft, thresholds):
    gen = torch.Generator().manual_seed(int(with_draft) + 10 * int(thresholds[0] * 10))
    args = _random_sampling_case(24, 37, gen, with_draft)
    got = _on_device(tree_speculative_sampling, *args, threshold_single=thresholds[0], threshold_acc=thresholds[1])
    want = tree_speculative_sampling_ref(*args, threshold_single=thresholds[0], threshold_acc=thresholds[1])
    _assert_all_equal(got, want)
    assert want[2].max() >= 2 and want[2].min() == 0  # both long paths and immediate rejections are covered


def test_tree_speculative_sampling_rejects_bad_arguments():
    args = to_device(list(_random_sampling_case(2, 11, torch.Generator().manual_seed(0), False)))
    with pytest.raises(ValueError, match="target_probs"):
        tree_speculative_sampling(*args[:5], args[5].double(), *args[6:])
    with pytest.raises(ValueError, match="uniform_samples_for_final_sampling"):
        tree_speculative_sampling(*args[:7], args[7][:1], args[8])
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        tree_speculative_sampling(*args[:8], 0)


# Chi-square critical value for 7 degrees of freedom (V = 8) at significance 1e-3: 24.32 (from the chi-square
# table; scipy.stats.chi2.ppf(0.999, 7) = 24.3219). A correct sampler fails with probability 1e-3 per seed; the
# seeds are fixed, so the test is deterministic.
CHI2_CRITICAL_DF7 = 24.32
STAT_VOCAB = 8
STAT_TRIALS = 20_000


def _chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples.long(), minlength=len(probs)).double()
    expected = probs.double() * len(samples)
    return float(((counts - expected) ** 2 / expected).sum())


def _statistical_case(trials: int):
    """Fixed target p at the root and p2 at every other node, a different draft q: the tree holds the top-3
    tokens of q under the root, and the top-2 tokens of q under the root's first child (depth 2)."""
    gen = torch.Generator().manual_seed(1234)
    p = torch.softmax(torch.randn(STAT_VOCAB, generator=gen), 0)
    p2 = torch.softmax(torch.randn(STAT_VOCAB, generator=gen), 0)
    q = torch.softmax(2 * torch.randn(STAT_VOCAB, generator=gen), 0)
    top = torch.argsort(q, descending=True)
    # nodes: 0 root; 1, 2, 3 children of the root; 4, 5 children of node 1.
    candidates = torch.tensor([0, top[0], top[1], top[2], top[0], top[1]]).repeat(trials, 1)
    n = candidates.shape[1]
    retrive_index = torch.arange(trials * n).view(trials, n)
    next_token = torch.tensor([1, 4, -1, -1, -1, -1]).repeat(trials, 1)
    next_sibling = torch.tensor([-1, 2, 3, -1, 5, -1]).repeat(trials, 1)
    target = torch.cat([p[None], p2[None].expand(n - 1, -1)]).repeat(trials, 1, 1)
    draft = q.repeat(trials, n, 1)
    coins = torch.rand(trials, n, generator=gen)
    final = torch.rand(trials, generator=gen)
    return (candidates, retrive_index, next_token, next_sibling, draft, target, coins, final), p, p2


def _committed(result, trials):
    predicts, accept_index, accept_length = result
    first = predicts[accept_index[:, 0].long()]
    second_rows = accept_length >= 1
    second = predicts[accept_index[second_rows, 1].long()]
    return first, second


def test_tree_speculative_sampling_is_lossless_chi_square():
    """Reference sampler over 20k vectorised trials: the first committed token follows the target p, and the one
    after an accepted draft token follows that node's target p2. The kernel equals the reference (tests above;
    and on the first 64 trials here), so the property carries over to it."""
    args, p, p2 = _statistical_case(STAT_TRIALS)
    no_draft = (*args[:4], None, *args[5:])
    result = tree_speculative_sampling_ref(*no_draft, 3)
    first, second = _committed(result, STAT_TRIALS)
    assert _chi_square(first, p) < CHI2_CRITICAL_DF7
    assert len(second) > 5_000 and _chi_square(second, p2) < CHI2_CRITICAL_DF7

    head = [a[:64] for a in no_draft[:4]] + [None] + [a[:64] for a in no_draft[5:]]
    _assert_all_equal(_on_device(tree_speculative_sampling, *head, 3), tree_speculative_sampling_ref(*head, 3))


def test_chi_square_catches_biased_samplers():
    args, p, _ = _statistical_case(STAT_TRIALS)
    no_draft = (*args[:4], None, *args[5:])
    # Always accepting the first draft child (threshold_single 0): the first token is always q's top token.
    first, _ = _committed(tree_speculative_sampling_ref(*no_draft, 3, threshold_single=0.0), STAT_TRIALS)
    assert _chi_square(first, p) > 10 * CHI2_CRITICAL_DF7
    # Subtracting a real draft distribution in the correction step (SGLang's formula with q != 0) is biased too.
    first, _ = _committed(tree_speculative_sampling_ref(*args, 3), STAT_TRIALS)
    assert _chi_square(first, p) > CHI2_CRITICAL_DF7


@pytest.mark.gpu
def test_tree_speculative_sampling_kernel_is_lossless_on_gpu():
    args, p, p2 = _statistical_case(200_000)
    args = [a.cuda() for a in (*args[:4], *args[5:])]
    result = tree_speculative_sampling(*args[:4], None, *args[4:], 3)
    first, second = _committed([t.cpu() for t in result], 200_000)
    assert _chi_square(first, p) < CHI2_CRITICAL_DF7
    assert _chi_square(second, p2) < CHI2_CRITICAL_DF7


@pytest.mark.parametrize("impl", [tree_speculative_sampling, tree_speculative_sampling_ref])
def test_tree_speculative_sampling_removes_rejected_tokens_across_vocab_blocks(impl):
    """Vocabulary of 3000 (several kernel blocks): the rejected children 5, 1500 and 2999 get no correction mass."""
    vocab = 3000
    candidates = torch.tensor([[0, 5, 1500, 2999]])
    retrive_index = torch.arange(4)[None]
    next_token = torch.tensor([[1, -1, -1, -1]])
    next_sibling = torch.tensor([[-1, 2, 3, -1]])
    target = torch.zeros(1, 4, vocab)
    target[0, 0, [5, 1500, 2999, 2000]] = torch.tensor([0.3, 0.3, 0.3, 0.1])
    coins = torch.full((1, 4), 0.95)  # above 0.3 + 0.3 + 0.3: every child is rejected
    for final in (0.0, 0.5, 0.999):
        predicts, accept_index, accept_length = _on_device(
            impl, candidates, retrive_index, next_token, next_sibling, None, target, coins, torch.tensor([final]), 2
        )
        assert accept_length.tolist() == [0] and accept_index.tolist() == [[0, -1]]
        assert predicts[0].item() == 2000


@pytest.mark.parametrize("impl", [tree_speculative_sampling, tree_speculative_sampling_ref])
def test_tree_speculative_sampling_bonus_ignores_draft_only_at_full_depth(impl):
    """Chain root -> 1 -> 2, both accepted. With num_speculative_tokens = 3 the path is full and the bonus comes
    from p; with 4 the leaf merely has no children, and the correction comes from relu(p - q) as in SGLang."""
    candidates = torch.tensor([[0, 10, 11]])
    retrive_index = torch.arange(3)[None]
    next_token = torch.tensor([[1, 2, -1]])
    next_sibling = torch.full((1, 3), -1)
    target = torch.zeros(1, 3, 16)
    target[0, 0, 10] = target[0, 1, 11] = 1.0
    target[0, 2, 3] = target[0, 2, 4] = 0.5
    draft = torch.zeros(1, 3, 16)
    draft[0, 2, 3] = 0.5
    coins = torch.full((1, 3), 0.5)
    final = torch.tensor([0.2])  # on p: token 3; on relu(p - q) = {4: 0.5}: token 4
    for num_spec, bonus in ((3, 3), (4, 4)):
        predicts, accept_index, accept_length = _on_device(
            impl, candidates, retrive_index, next_token, next_sibling, draft, target, coins, final, num_spec
        )
        assert accept_length.tolist() == [2]
        assert accept_index[0, :3].tolist() == [0, 1, 2]
        assert predicts.tolist() == [10, 11, bonus]
