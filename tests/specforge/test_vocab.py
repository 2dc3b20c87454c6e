"""Draft vocabulary mapping: SpecForge's d2t/t2d semantics, tie-breaking and filling, token counting."""

from __future__ import annotations

from collections import Counter

import datasets
import pytest
import torch

from specforge.vocab import build_vocab_mapping, count_tokens


def specforge_reference(token_dict: Counter, draft_vocab_size: int, vocab_size: int):
    """SpecForge's process_token_dict_to_mappings, restated: top-N by count, sorted; d2t offsets; t2d membership."""
    used = sorted(token for token, _ in token_dict.most_common(draft_vocab_size))
    d2t = torch.tensor([t - i for i, t in enumerate(used)])
    t2d = torch.tensor([i in used for i in range(vocab_size)])
    return d2t, t2d


def test_hand_worked_example():
    counts = torch.zeros(10, dtype=torch.int64)
    counts[3], counts[2], counts[7], counts[9] = 9, 5, 5, 1
    d2t, t2d = build_vocab_mapping(counts, vocab_size=10, draft_vocab_size=3)
    # top 3: 3 (9), then the tie 2 and 7 (5 each); sorted -> [2, 3, 7]
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool
    assert d2t.tolist() == [2 - 0, 3 - 1, 7 - 2]
    assert t2d.tolist() == [i in (2, 3, 7) for i in range(10)]
    # draft ids map back: target = draft + d2t[draft]
    assert (torch.arange(3) + d2t).tolist() == [2, 3, 7]


def test_ties_go_to_the_lower_id_and_unseen_ids_fill_lowest_first():
    counts = torch.zeros(10, dtype=torch.int64)
    counts[5], counts[1] = 2, 2
    d2t, _ = build_vocab_mapping(counts, 10, 1)
    assert (torch.arange(1) + d2t).tolist() == [1]
    counts[8] = 4
    d2t, t2d = build_vocab_mapping(counts, 10, 5)
    # seen: 8, 1, 5; filled with the lowest unseen ids 0 and 2
    assert (torch.arange(5) + d2t).tolist() == [0, 1, 2, 5, 8]
    assert t2d.sum().item() == 5


def test_matches_specforge_on_random_counts_without_ties():
    g = torch.Generator().manual_seed(0)
    vocab, draft = 500, 64
    counts = torch.randperm(vocab * 4, generator=g)[:vocab]  # distinct counts: no ties
    token_dict = Counter({i: int(c) for i, c in enumerate(counts) if c > 0})
    d2t, t2d = build_vocab_mapping(counts, vocab, draft)
    ref_d2t, ref_t2d = specforge_reference(token_dict, draft, vocab)
    assert torch.equal(d2t, ref_d2t) and torch.equal(t2d, ref_t2d)


def test_full_draft_vocab_is_identity():
    d2t, t2d = build_vocab_mapping(torch.tensor([0, 3, 1, 0]), 4, 4)
    assert d2t.tolist() == [0, 0, 0, 0] and t2d.all()


ROWS = [
    {"input_ids": [1, 5, 5, 2, 7], "loss_mask": [0, 1, 1, 0, 1]},
    {"input_ids": [5, 3, 3, 3], "loss_mask": [1, 1, 1, 0]},
    {"input_ids": [9], "loss_mask": [0]},
]


def test_count_tokens_counts_only_loss_masked_tokens():
    counts = count_tokens(ROWS, vocab_size=12)
    expected = torch.zeros(12, dtype=torch.int64)
    expected[5], expected[7], expected[3] = 3, 1, 2
    assert torch.equal(counts, expected)
    assert count_tokens(ROWS).tolist() == expected[:8].tolist()  # without vocab_size: up to the largest id
    ds = datasets.Dataset.from_list(ROWS)
    assert torch.equal(count_tokens(ds, vocab_size=12), expected)
    assert torch.equal(count_tokens(ds.with_format("torch"), vocab_size=12), expected)


def test_build_from_dataset_directly():
    d2t, t2d = build_vocab_mapping(datasets.Dataset.from_list(ROWS), vocab_size=12, draft_vocab_size=2)
    assert (torch.arange(2) + d2t).tolist() == [3, 5]
    assert t2d.nonzero().flatten().tolist() == [3, 5]


def test_errors():
    with pytest.raises(ValueError, match="outside the target vocabulary"):
        count_tokens(ROWS, vocab_size=6)
    with pytest.raises(ValueError, match="row 0: input_ids has 2 tokens but loss_mask has 1"):
        count_tokens([{"input_ids": [1, 2], "loss_mask": [1]}])
    with pytest.raises(ValueError, match="draft_vocab_size must be in"):
        build_vocab_mapping(torch.ones(4, dtype=torch.int64), 4, 5)
    with pytest.raises(ValueError, match="more than vocab_size"):
        build_vocab_mapping(torch.ones(8, dtype=torch.int64), 4, 2)


def test_mapping_round_trips_through_a_draft_checkpoint(tmp_path):
    from specbundle.checkpoint import load_draft, save_draft
    from specbundle.config import DraftConfig
    from specbundle.modeling import Eagle3DraftModel

    vocab, draft = 50, 8
    counts = torch.zeros(vocab, dtype=torch.int64)
    frequent = [41, 3, 17, 29, 8, 44, 12, 0]
    counts[frequent] = torch.arange(100, 100 - len(frequent), -1)
    counts[[5, 6]] = 1  # rarer than every pick
    d2t, t2d = build_vocab_mapping(counts, vocab, draft)
    cfg = DraftConfig(
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        vocab_size=vocab,
        draft_vocab_size=draft,
    )
    model = Eagle3DraftModel(cfg)
    model.d2t.copy_(d2t)
    model.t2d.copy_(t2d)
    loaded = load_draft(save_draft(model, tmp_path / "draft"))
    assert loaded.draft_to_target(torch.arange(draft)).tolist() == sorted(frequent)
    assert torch.equal(loaded.t2d, t2d)
