"""prepare_data readers (ShareGPT, UltraChat, OpenAI messages), the tokenized dataset, and the CLI subcommands."""

from __future__ import annotations

import argparse
import json

import pytest

from specbundle.assets import sharegpt_path
from specforge.data.commands import add_subcommands
from specforge.data.dataset import build_dataset
from specforge.data.formats import prepare_data, validate_normalized
from specforge.data.template import CHAT_TEMPLATES, tokenize_conversation
from tests.specforge.test_template import smollm2_tokenizer, tiny_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def turns(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_sharegpt_json_list_with_quirks_and_a_cut_off_end(tmp_path):
    rows = [
        {"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        # split chats start mid-conversation: leading assistant turns go
        {
            "id": "b",
            "conversations": [
                {"from": "gpt", "value": "...cont"},
                {"from": "human", "value": "Q"},
                {"from": "chatgpt", "value": "A"},
                {"from": "human", "value": "Q2"},
            ],
        },
        {
            "id": "c",
            "conversations": [
                {"from": "system", "value": "Sys"},
                {"from": "human", "value": "Q"},
                {"from": "bard", "value": "A"},
                {"from": "gpt", "value": "A again"},
            ],
        },
        {"id": "d", "conversations": []},
        {"id": "e", "conversations": [{"from": "human", "value": "Q"}, {"from": "tool", "value": "x"}]},
        "not an object",
        {"id": "f", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "  "}]},
        {"id": "a", "conversations": [{"from": "human", "value": "dup"}, {"from": "gpt", "value": "id"}]},
    ]
    text = json.dumps(rows, indent=1)
    text = text[: text.rindex("]")] + ',\n {"id": "g", "conversations": [{"from": "human", "val'  # cut mid-row
    src = tmp_path / "sharegpt.json"
    src.write_text(text)
    out = tmp_path / "out.jsonl"

    summary = prepare_data([str(src)], "sharegpt", str(out))

    assert read_jsonl(out) == [
        {"id": "a", "conversations": turns(("user", "Hi"), ("assistant", "Hello"))},
        {"id": "b", "conversations": turns(("user", "Q"), ("assistant", "A"), ("user", "Q2"))},
        {"id": "c", "conversations": turns(("system", "Sys"), ("user", "Q"), ("assistant", "A"))},
        {"id": "f", "conversations": turns(("user", "Q"))},
        {"id": "a#1", "conversations": turns(("user", "dup"), ("assistant", "id"))},
    ]
    assert (summary.read, summary.written, summary.skipped) == (9, 5, 4)
    assert summary.skipped_by_reason == {
        "empty conversation": 1,
        "unknown role": 1,
        "row is not a JSON object": 1,
        "invalid JSON (rest of the list unreadable)": 1,
    }
    assert summary.repaired_by_reason == {
        "dropped assistant turns before the first user turn": 1,
        "cut at a repeated role": 1,
        "cut at an empty message": 1,
        "renamed a duplicate id": 1,
    }
    assert summary.examples["unknown role"] == f"{src}:5: conversations[1] role 'tool'"
    assert summary.examples["invalid JSON (rest of the list unreadable)"].startswith(f"{src}:9: ")


def test_jsonl_bad_lines_are_counted_by_line_number(tmp_path, capsys):
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "1", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
            "{not json",
            {"id": "3", "conversations": "oops"},
            {"id": "4", "conversations": [{"from": "human", "value": {"x": 1}}]},
            {"id": "5", "conversations": [{"value": "Q"}]},
            {"id": "6"},
        ],
    )
    out = tmp_path / "out.jsonl"
    summary = prepare_data([src], "auto", str(out))
    assert [r["id"] for r in read_jsonl(out)] == ["1"]
    assert summary.skipped_by_reason == {
        "invalid JSON": 1,
        "field 'conversations' is not a list": 1,
        "content is not text": 1,
        "missing role": 1,
        "unrecognized row": 1,
    }
    assert summary.examples["invalid JSON"].startswith(f"{src}:2: ")
    assert summary.examples["content is not text"] == f"{src}:4: conversations[0] content is a dict"
    printed = capsys.readouterr().out
    assert "read 6 rows, wrote 1, skipped 5" in printed and "invalid JSON" in printed


def test_ultrachat_and_openai_rows(tmp_path):
    src = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "Q", "prompt_id": "p1", "messages": turns(("user", "Q"), ("assistant", "A"))},
            {"id": 7, "data": ["Q1", "A1", "Q2", "A2"]},
            {
                "messages": [
                    {"role": "developer", "content": "Sys"},
                    {"role": "user", "content": [{"type": "text", "text": "Look "}, {"type": "text", "text": "here"}]},
                    {"role": "assistant", "content": "Done"},
                ]
            },
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            {
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A", "reasoning_content": "R"},
                ]
            },
        ],
    )
    out = tmp_path / "out.jsonl"
    summary = prepare_data([src], "ultrachat", str(out))
    assert read_jsonl(out) == [
        {"id": "p1", "conversations": turns(("user", "Q"), ("assistant", "A"))},
        {"id": "7", "conversations": turns(("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2"))},
        {"id": "mixed-3", "conversations": turns(("system", "Sys"), ("user", "Look here"), ("assistant", "Done"))},
        {"id": "mixed-5", "conversations": turns(("user", "Q"), ("assistant", "<think>\nR\n</think>\n\nA"))},
    ]
    assert summary.skipped_by_reason == {"non-text content": 1}

    # An explicit format only accepts its own field.
    summary = prepare_data([src], "openai", str(out))
    assert summary.written == 3 and summary.skipped_by_reason == {"missing field 'messages'": 1, "non-text content": 1}
    summary = prepare_data([src], "sharegpt", str(out))
    assert summary.written == 0 and summary.skipped_by_reason == {"missing field 'conversations'": 5}


def test_limit_and_several_inputs(tmp_path):
    a = write_jsonl(
        tmp_path / "a.jsonl", [{"messages": turns(("user", f"Q{i}"), ("assistant", "A"))} for i in range(3)]
    )
    b = write_jsonl(
        tmp_path / "b.jsonl", [{"messages": turns(("user", f"R{i}"), ("assistant", "A"))} for i in range(3)]
    )
    out = tmp_path / "out.jsonl"
    summary = prepare_data([a, b], "openai", str(out), limit=4)
    assert [r["id"] for r in read_jsonl(out)] == ["a-1", "a-2", "a-3", "b-1"]
    assert summary.written == 4
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        prepare_data([str(tmp_path / "missing.jsonl")], "auto", str(out))
    with pytest.raises(ValueError, match="unknown format 'alpaca'"):
        prepare_data([a], "alpaca", str(out))


def test_real_sharegpt_file_from_the_package(tmp_path):
    out = tmp_path / "sharegpt.jsonl"
    summary = prepare_data([str(sharegpt_path())], "auto", str(out), limit=500)
    rows = read_jsonl(out)
    assert summary.written == len(rows) == 500
    assert rows[0]["id"] == "QWJhYvA_0"
    assert rows[0]["conversations"][0]["content"].startswith("Summarize the main ideas of Jeff Walker's")
    for row in rows:
        validate_normalized(row)
    assert len({r["id"] for r in rows}) == 500
    prepare_data(["sharegpt"], "auto", str(out), limit=3)  # by name, as SpecForge's --dataset sharegpt
    assert read_jsonl(out) == rows[:3]


@pytest.fixture()
def chat_jsonl(tmp_path):
    return write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"id": "a", "conversations": turns(("user", "Hello there"), ("assistant", "The answer is four."))},
            {"id": "b", "conversations": turns(("user", "Be brief."))},  # no assistant turn: dropped
            {"id": "c", "conversations": turns(("user", "How can I help you today? " * 20), ("assistant", "Hi"))},
            {
                "id": "d",
                "conversations": turns(
                    ("system", "S"), ("user", "Q"), ("assistant", "A"), ("user", "Q2"), ("assistant", "A2")
                ),
            },
            {"id": "e", "conversations": turns(("assistant", "A"))},  # invalid: dropped
            {"id": 6, "conversations": turns(("user", "Q"), ("assistant", "A"))},  # numeric id: kept
        ],
    )


def test_build_dataset_tokenizes_and_drops_rows_without_loss_tokens(chat_jsonl, tmp_path, caplog):
    tok = tiny_tokenizer()
    rows = read_jsonl(chat_jsonl)
    ds = build_dataset(chat_jsonl, tok, max_length=64, chat_template="chatml", cache_dir=str(tmp_path / "cache"))
    assert ds.column_names == ["input_ids", "loss_mask"]
    # c's assistant turn lies past max_length; b has none; e is invalid.
    assert len(ds) == 3
    for got, row in zip(ds, [rows[0], rows[3], rows[5]]):
        assert got == tokenize_conversation(tok, row["conversations"], 64, "chatml")
    assert "dropped 3 of 6 rows (2 with no assistant tokens within max_length=64, 1 invalid" in caplog.text
    assert all(str(tmp_path / "cache") in f["filename"] for f in ds.cache_files)


def test_build_dataset_with_real_tokenizer_and_data(tmp_path):
    src = tmp_path / "sharegpt.jsonl"
    prepare_data([str(sharegpt_path())], "auto", str(src), limit=40)
    tok = smollm2_tokenizer()
    ds = build_dataset(str(src), tok, max_length=256, cache_dir=str(tmp_path / "cache"))
    assert 0 < len(ds) <= 40
    for row in ds.select(range(5)):
        assert len(row["input_ids"]) == len(row["loss_mask"]) <= 256
        text = tok.decode([t for t, m in zip(row["input_ids"], row["loss_mask"]) if m])
        assert "<|im_end|>" in text or len(row["input_ids"]) == 256
        assert "<|im_start|>" not in text


def test_build_dataset_counts_rows_the_template_refuses(chat_jsonl, tmp_path, caplog):
    no_system = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + CHAT_TEMPLATES["chatml"]
    )
    ds = build_dataset(chat_jsonl, tiny_tokenizer(), 64, chat_template=no_system, cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 2  # d has a system turn
    assert "2 invalid; first: row 'd': System role not supported" in caplog.text


def test_build_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        build_dataset(str(tmp_path / "none.jsonl"), tiny_tokenizer(), 64, chat_template="chatml")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": turns(("user", "Q"), ("assistant", "A"))}])
    none = write_jsonl(tmp_path / "none.jsonl", [{"id": "x", "conversations": turns(("user", "Q"))}])
    with pytest.raises(ValueError, match="no usable rows"):
        build_dataset(none, tiny_tokenizer(), 64, chat_template="chatml", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"lack field\(s\) \['id', 'conversations'\]"):
        build_dataset(bad, tiny_tokenizer(), 64, chat_template="chatml", cache_dir=str(tmp_path / "cache"))


def test_cli_subcommands(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="specforge")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    src = write_jsonl(tmp_path / "in.jsonl", [{"messages": turns(("user", "Q"), ("assistant", "A"))}])
    out = tmp_path / "out.jsonl"
    args = parser.parse_args(["prepare-data", src, "--format", "openai", "--output", str(out), "--limit", "5"])
    assert args.func(args) == 0
    assert read_jsonl(out) == [{"id": "in-1", "conversations": turns(("user", "Q"), ("assistant", "A"))}]

    args = parser.parse_args(
        [
            "regenerate",
            "--input",
            src,
            "--output",
            "o.jsonl",
            "--server-url",
            "http://a:1",
            "--server-url",
            "b:2",
            "--model",
            "m",
            "--concurrency",
            "4",
            "--max-tokens",
            "16",
            "--temperature",
            "0.5",
            "--api-key",
            "k",
        ]
    )
    assert args.server_url == ["http://a:1", "b:2"]
    assert (args.model, args.concurrency, args.max_tokens, args.temperature, args.api_key) == ("m", 4, 16, 0.5, "k")
    assert callable(args.func) and args.enable_thinking is None
    base = ["regenerate", "--input", src, "--output", "o.jsonl", "--server-url", "a:1"]
    assert parser.parse_args(base + ["--disable-thinking"]).enable_thinking is False
    assert parser.parse_args(base + ["--enable-thinking"]).enable_thinking is True
    assert parser.parse_args(base + ["--num-samples", "9"]).limit == 9 and parser.parse_args(base).limit is None
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare-data", src, "--format", "alpaca", "--output", "x"])
    assert "invalid choice: 'alpaca'" in capsys.readouterr().err
