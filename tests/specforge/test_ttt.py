"""Training-time test: the TTT mask, attention, alignment and loss against explicit references."""

import math

import pytest
import torch
import torch.nn.functional as F

from specbundle.config import DraftConfig
from specbundle.layers import sdpa_reference
from specbundle.modeling import Eagle3DraftModel
from specforge.core import (
    Eagle3TrainModule,
    TTTAttention,
    accept_length,
    prepare_targets,
    ttt_attention,
    ttt_mask,
    weighted_loss,
)


def test_ttt_mask_matches_hand_written():
    # T=3, step 2: step-0 keys causal; steps 1 and 2 contribute only each query's own position.
    expected = torch.tensor([
        [1, 0, 0, 1, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 1, 0],
        [1, 1, 1, 0, 0, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(ttt_mask(3, 2)[0], expected)
    # third token is padding: nobody attends to its keys at any step
    padded = ttt_mask(3, 1, torch.tensor([[1, 1, 0]]))[0]
    assert torch.equal(padded, torch.tensor([
        [1, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 0, 0, 0],
    ], dtype=torch.bool))
    assert torch.equal(ttt_mask(4, 0)[0], torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2)])
def test_ttt_attention_equals_dense_attention_with_explicit_mask(hq, hkv):
    torch.manual_seed(0)
    b, t, d, steps = 2, 5, 8, 4
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ctx = TTTAttention(b, t, attn)
    ks, vs = [], []
    for step in range(steps):
        q = torch.randn(b * t, hq, d)
        k, v = torch.randn(b * t, hkv, d), torch.randn(b * t, hkv, d)
        ks.append(k.view(b, t, hkv, d))
        vs.append(v.view(b, t, hkv, d))
        out = ttt_attention(q, k, v, ctx).view(b, t, hq, d)
        mask = ttt_mask(t, step, attn)  # [B, T, T*(step+1)]
        for bi in range(b):
            kk = torch.cat([x[bi] for x in ks])  # [T*(step+1), Hkv, D], step-major like the mask
            vv = torch.cat([x[bi] for x in vs])
            ref = sdpa_reference(q.view(b, t, hq, d)[bi], kk, vv, mask[bi], d**-0.5)
            torch.testing.assert_close(out[bi], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)])
def test_fused_ttt_attention_matches_the_unfused_one_with_gradients(hq, hkv):
    """The flash + log-sum-exp merge path (on CPU through torch's CPU flash kernels) against the explicit one: the
    outputs and every input's gradient at real positions, over 4 steps, with padding."""
    torch.manual_seed(0)
    b, t, d, steps = 2, 7, 8, 4
    attn = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    real = attn.bool().view(-1)
    inputs = [[torch.randn(b * t, h, d, dtype=torch.float64, requires_grad=True) for h in (hq, hkv, hkv)]
              for _ in range(steps)]
    weights = torch.randn(steps, b * t, hq, d, dtype=torch.float64)
    results = {}
    for fused in (False, True):
        ctx = TTTAttention(b, t, attn, fused=fused)
        outs = [ttt_attention(q, k, v, ctx) for q, k, v in inputs]
        loss = sum((o * w)[real].sum() for o, w in zip(outs, weights))
        grads = torch.autograd.grad(loss, [x for step in inputs for x in step])
        results[fused] = ([o[real] for o in outs], [g.view(b * t, -1)[real] for g in grads])
    for got, want in zip(sum(results[True], []), sum(results[False], [])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # the unfused softmax runs in fp32


def _tiny_draft(vocab=32, draft_vocab=16, hidden=32):
    cfg = DraftConfig(hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      vocab_size=vocab, draft_vocab_size=draft_vocab, max_position_embeddings=64)
    torch.manual_seed(0)
    draft = Eagle3DraftModel(cfg)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[torch.randperm(vocab)[:draft_vocab].sort().values] = True
    draft.t2d.copy_(t2d)
    draft.d2t.copy_(t2d.nonzero().squeeze(1) - torch.arange(draft_vocab))
    return draft


def _reference_ttt(draft, embeds, aux, logits, loss_mask, lengths, k):
    """TTT written from the docstring's alignment, one sequence at a time, dense attention with ttt_mask."""
    b, t, _ = embeds.shape
    t2d = draft.t2d
    plosses, correct, counted = torch.zeros(k), torch.zeros(k), torch.zeros(k)
    for bi in range(b):
        n = lengths[bi]
        valid = (torch.arange(t) < n)[None]
        keys, values = [], []

        def attn(q, kk, vv, _ctx, keys=keys, values=values, valid=valid):
            keys.append(kk)
            values.append(vv)
            mask = ttt_mask(t, len(keys) - 1, valid)[0]
            return sdpa_reference(q, torch.cat(keys), torch.cat(values), mask, q.shape[-1] ** -0.5)

        hidden = aux[bi]
        for i in range(k):
            # step i, position p reads embed(x_{p+i+1}) (zeros past the end)
            e = torch.stack([embeds[bi, p + i + 1] if p + i + 1 < t else torch.zeros_like(embeds[bi, 0])
                             for p in range(t)])
            normed, hidden = draft(e, hidden, torch.arange(t), attn)
            lg = draft.compute_logits(normed).float()
            for p in range(t):
                j = p + i + 1  # the target's distribution of x_{j+1} is logits[j]
                if p + i < t and loss_mask[bi, p + i] and j < n:
                    counted[i] += 1
                    z = logits[bi, j]
                    if t2d[z.argmax()]:
                        target_p = z[t2d].float().softmax(-1)
                        plosses[i] += -(target_p * lg[p].log_softmax(-1)).sum()
                        correct[i] += float(lg[p].argmax() == target_p.argmax())
    return plosses / (b * t), correct, counted


@pytest.mark.parametrize("fused", [False, True])
def test_ttt_loss_and_accuracy_match_explicit_reference(fused):
    torch.manual_seed(1)
    draft = _tiny_draft()
    b, t, k = 2, 6, 3
    embeds, aux = torch.randn(b, t, 32), torch.randn(b, t, 96)
    logits = torch.randn(b, t, 32) * 3
    lengths = [6, 4]
    attn = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).long()
    loss_mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
    tg = prepare_targets(logits, draft.t2d, loss_mask, attn, k)
    module = Eagle3TrainModule(draft, k, fused_attention=fused)
    plosses, correct, counted = module(embeds, aux, tg.target_p, tg.position_mask, tg.loss_mask, attn)
    ref_loss, ref_correct, ref_counted = _reference_ttt(draft, embeds, aux, logits, loss_mask, lengths, k)
    torch.testing.assert_close(plosses, ref_loss, rtol=1e-4, atol=1e-5)
    assert correct.tolist() == ref_correct.tolist()
    assert counted.tolist() == ref_counted.tolist()
    # by hand: step i counts p with loss_mask[p+i] and p+i+1 < length: seq 0 gives 4, 4, 3; seq 1 gives 1, 1, 1
    assert counted.tolist() == [5, 5, 4]
    weighted_loss(plosses).backward()
    assert draft.fc.weight.grad is not None and draft.fc.weight.grad.abs().sum() > 0


def test_positions_whose_target_argmax_is_outside_draft_vocab_are_not_scored():
    draft = _tiny_draft()
    outside = int((~draft.t2d).nonzero()[0])
    logits = torch.zeros(1, 4, 32)
    logits[0, :, outside] = 10.0  # the target's top token is never in the draft vocabulary
    ones = torch.ones(1, 4, dtype=torch.long)
    tg = prepare_targets(logits, draft.t2d, ones, ones, 2)
    assert not tg.position_mask.any()
    plosses, correct, counted = Eagle3TrainModule(draft, 2)(torch.randn(1, 4, 32), torch.randn(1, 4, 96),
                                                           tg.target_p, tg.position_mask, tg.loss_mask, ones)
    assert plosses.abs().sum() == 0 and correct.sum() == 0
    assert counted.tolist() == [3, 2]  # still in the accuracy denominator, as SpecForge counts them


def test_weighted_loss_and_accept_length_by_hand():
    assert math.isclose(weighted_loss(torch.tensor([1.0, 1.0, 2.0])).item(), 1 + 0.8 + 2 * 0.64, rel_tol=1e-6)
    assert math.isclose(accept_length([0.8, 0.5]), 1 + 0.8 + 0.8 * 0.5)
    assert accept_length([0.0, 1.0, 1.0]) == 1.0
    assert accept_length([1.0] * 7) == 8.0


def test_prepare_targets_shifts_by_one():
    logits = F.one_hot(torch.tensor([[3, 1, 2, 0]]), 4).float() * 5
    t2d = torch.ones(4, dtype=torch.bool)
    ones = torch.ones(1, 4, dtype=torch.long)
    tg = prepare_targets(logits, t2d, ones, ones, 2)
    assert tg.target_p[0, :3].argmax(-1).tolist() == [1, 2, 0]  # row t is the target of x_{t+1}'s successor
    assert tg.target_p.shape == (1, 6, 4)
    assert tg.position_mask.tolist() == [[True, True, True, False]]
