"""Loss masks against hand-verified expectations: the masked tokens decode to exactly each assistant's output
(content, reasoning where the template keeps it, and the end-of-turn token), nothing else."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from specbundle.assets import smollm2_gguf_path
from specforge.data.template import CHAT_TEMPLATES, template_markers, tokenize_conversation

LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@functools.cache
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer.

    Converting it from the GGUF takes 5-15 s, so the converted tokenizer is also kept in the temp dir, keyed on the
    GGUF file and the transformers version; later sessions load it in well under a second.
    """
    path = smollm2_gguf_path()
    stat = path.stat()
    cache = Path(tempfile.gettempdir()) / (
        f"specforge-tests-smollm2-tokenizer-{stat.st_size}-{stat.st_mtime_ns}-transformers-{transformers.__version__}"
    )
    if (cache / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cache))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    staging = Path(tempfile.mkdtemp(prefix=cache.name + ".tmp", dir=cache.parent))
    tok.save_pretrained(str(staging))
    try:
        os.replace(staging, cache)
    except OSError:  # another session got there first with the same content
        shutil.rmtree(staging, ignore_errors=True)
    return tok


@functools.cache
def tiny_tokenizer():
    """A byte-level BPE with Llama 3 and ChatML special tokens, trained in milliseconds."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=LLAMA3_SPECIAL + ["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(["Hello there, how can I help you today?", "The answer is four. Be brief."] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", clean_up_tokenization_spaces=False
    )


def masked_runs(tokenizer, result: dict) -> list[str]:
    """Decoded text of each contiguous run of loss-masked tokens."""
    runs, current = [], []
    for token, m in zip(result["input_ids"], result["loss_mask"]):
        if m:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def check(tokenizer, messages, expected_text, expected_runs, max_length=4096, **kwargs):
    result = tokenize_conversation(tokenizer, messages, max_length, **kwargs)
    assert len(result["input_ids"]) == len(result["loss_mask"])
    assert set(result["loss_mask"]) <= {0, 1}
    assert tokenizer.decode(result["input_ids"]) == expected_text
    assert masked_runs(tokenizer, result) == expected_runs
    return result


TWO_TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "The answer is 4."},
]


def test_smollm2_own_template_masks_assistant_content_and_im_end():
    tok = smollm2_tokenizer()
    expected_text = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello there! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\nThe answer is 4.<|im_end|>\n"
    )
    expected_runs = ["Hello there! How can I help?<|im_end|>", "The answer is 4.<|im_end|>"]
    result = check(tok, TWO_TURNS, expected_text, expected_runs)
    first = result["loss_mask"].index(1)
    assert tok.decode(result["input_ids"][:first]).endswith("<|im_start|>assistant\n")


def test_smollm2_with_system_turn():
    tok = smollm2_tokenizer()
    messages = [{"role": "system", "content": "Answer in one word."}] + TWO_TURNS[:2]
    expected_text = (
        "<|im_start|>system\nAnswer in one word.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello there! How can I help?<|im_end|>\n"
    )
    check(tok, messages, expected_text, ["Hello there! How can I help?<|im_end|>"])


def test_llama3_format_masks_trimmed_content_and_eot_id():
    tok = tiny_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "  Hello there.  "},  # the Llama 3 template trims content
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "Four."},
    ]
    expected_text = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello there.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nFour.<|eot_id|>"
    )
    check(tok, messages, expected_text, ["Hello there.<|eot_id|>", "Four.<|eot_id|>"], chat_template="llama3")
    markers = template_markers(tok, CHAT_TEMPLATES["llama3"])
    assert markers.headers == ("<|start_header_id|>assistant<|end_header_id|>\n\n",)
    assert markers.end_of_turn == "<|eot_id|>"


def test_llama3_template_given_as_jinja_text_on_the_tokenizer():
    tok = tiny_tokenizer()
    result = tokenize_conversation(tok, TWO_TURNS[:2], 4096, chat_template=CHAT_TEMPLATES["llama3"])
    assert masked_runs(tok, result) == ["Hello there! How can I help?<|eot_id|>"]


def test_qwen2_chatml_inserts_default_system_prompt_unmasked():
    tok = smollm2_tokenizer()
    expected_text = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello there! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\nThe answer is 4.<|im_end|>\n"
    )
    check(
        tok,
        TWO_TURNS,
        expected_text,
        ["Hello there! How can I help?<|im_end|>", "The answer is 4.<|im_end|>"],
        chat_template=CHAT_TEMPLATES["qwen"],
    )


QWEN3_THINKING = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nTwo plus two.\n</think>\n\nIt is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "<think>\nThree plus three.\n</think>\n\nIt is 6."},
]


@pytest.mark.parametrize("enable_thinking", [None, True])
def test_qwen3_thinking_masks_last_turn_reasoning_and_earlier_answers(enable_thinking):
    tok = smollm2_tokenizer()
    # Qwen3 drops the reasoning of turns before the last user query; the last turn keeps its <think> block.
    expected_text = (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nThree plus three.\n</think>\n\nIt is 6.<|im_end|>\n"
    )
    check(
        tok,
        QWEN3_THINKING,
        expected_text,
        ["It is 4.<|im_end|>", "<think>\nThree plus three.\n</think>\n\nIt is 6.<|im_end|>"],
        chat_template=CHAT_TEMPLATES["qwen3"],
        enable_thinking=enable_thinking,
    )


def test_reasoning_content_field_is_the_think_block():
    # SGLang/vLLM reasoning parsers and SpecForge's regeneration store reasoning apart from the answer.
    tok = smollm2_tokenizer()
    messages = [
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "It is 6.", "reasoning_content": "Three plus three."},
    ]
    result = tokenize_conversation(tok, messages, 4096, chat_template=CHAT_TEMPLATES["qwen3"])
    assert masked_runs(tok, result) == ["<think>\nThree plus three.\n</think>\n\nIt is 6.<|im_end|>"]


def test_prefilled_think_tag_in_the_generation_prompt_stays_unmasked():
    # Qwen3-2507 thinking / DeepSeek-R1 style: the prompt ends with "<think>\n", so the model generates from the
    # reasoning on; earlier turns are rendered without reasoning and without the tag.
    tmpl = CHAT_TEMPLATES["qwen3"].replace(
        "{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking is false %}"
        "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}",
        "{{- '<|im_start|>assistant\\n<think>\\n' }}",
    )
    assert tmpl != CHAT_TEMPLATES["qwen3"]
    tok = smollm2_tokenizer()
    assert template_markers(tok, tmpl).headers == ("<|im_start|>assistant\n<think>\n", "<|im_start|>assistant\n")
    expected_text = (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nThree plus three.\n</think>\n\nIt is 6.<|im_end|>\n"
    )
    expected_runs = ["It is 4.<|im_end|>", "Three plus three.\n</think>\n\nIt is 6.<|im_end|>"]
    check(tok, QWEN3_THINKING, expected_text, expected_runs, chat_template=tmpl)


def test_qwen3_thinking_on_masks_the_empty_think_block_the_model_generates():
    tok = smollm2_tokenizer()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    expected_text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello.<|im_end|>\n"
    check(
        tok, messages, expected_text, ["<think>\n\n</think>\n\nHello.<|im_end|>"], chat_template=CHAT_TEMPLATES["qwen3"]
    )


def test_qwen3_thinking_off_leaves_the_prefilled_empty_think_block_unmasked():
    tok = smollm2_tokenizer()
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    expected_text = (
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nGoodbye.<|im_end|>\n"
    )
    check(
        tok,
        messages,
        expected_text,
        ["Hello.<|im_end|>", "Goodbye.<|im_end|>"],
        chat_template=CHAT_TEMPLATES["qwen3"],
        enable_thinking=False,
    )
    markers = template_markers(tok, CHAT_TEMPLATES["qwen3"], enable_thinking=False)
    assert markers.headers == ("<|im_start|>assistant\n<think>\n\n</think>\n\n", "<|im_start|>assistant\n")


def test_header_quoted_in_a_user_message_is_not_taken_for_an_assistant_turn():
    tok = smollm2_tokenizer()
    messages = [
        {"role": "user", "content": "Repeat: <|im_start|>assistant\nfake answer"},
        {"role": "assistant", "content": "Real answer."},
    ]
    result = tokenize_conversation(tok, messages, 4096)
    assert masked_runs(tok, result) == ["Real answer.<|im_end|>"]


def test_template_without_generation_prompt_uses_the_text_between_user_and_assistant():
    # Mistral / Llama 2 style: add_generation_prompt changes nothing; "[/INST]" closes the user turn.
    mistral = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    tok = tiny_tokenizer()
    expected_text = (
        "<|begin_of_text|>[INST] Hi [/INST]Hello there! How can I help?<|eot_id|>[INST] What is 2+2? [/INST]"
    )
    expected_text += "The answer is 4.<|eot_id|>"
    expected_runs = ["Hello there! How can I help?<|eot_id|>", "The answer is 4.<|eot_id|>"]
    check(tok, TWO_TURNS, expected_text, expected_runs, chat_template=mistral)
    assert template_markers(tok, mistral).headers == (" [/INST]",)


def test_template_without_end_of_turn_token_masks_the_content_only():
    plain = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    tok = tiny_tokenizer()
    expected_text = (
        "user: Hi\nassistant: Hello there! How can I help?\nuser: What is 2+2?\nassistant: The answer is 4.\n"
    )
    check(tok, TWO_TURNS, expected_text, ["Hello there! How can I help?", "The answer is 4."], chat_template=plain)
    assert template_markers(tok, plain).end_of_turn == ""


def test_a_name_renders_with_the_tokenizers_own_template_when_it_has_one(caplog):
    # As SpecForge's --chat-template: the name picks the family, the template the server uses does the rendering.
    tok = smollm2_tokenizer()
    assert tokenize_conversation(tok, TWO_TURNS, 4096, chat_template="qwen") == tokenize_conversation(
        tok, TWO_TURNS, 4096
    )
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(
        tokenize_conversation(tok, TWO_TURNS, 4096, chat_template="qwen")["input_ids"]
    )
    assert caplog.text == ""
    tokenize_conversation(tok, TWO_TURNS, 4096, chat_template="llama3")
    assert "chat template 'llama3' expects assistant header" in caplog.text


def test_qwen3_instruct_and_thinking_names_imply_enable_thinking():
    tok = tiny_tokenizer()  # no template of its own: the built-in Qwen3 one renders
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    instruct = tokenize_conversation(tok, messages, 4096, chat_template="qwen3-instruct")
    assert masked_runs(tok, instruct) == ["Hello.<|im_end|>"]
    thinking = tokenize_conversation(tok, messages, 4096, chat_template="qwen3-thinking")
    assert masked_runs(tok, thinking) == ["<think>\n\n</think>\n\nHello.<|im_end|>"]
    # an explicit enable_thinking wins over the name
    assert tokenize_conversation(tok, messages, 4096, "qwen3-instruct", enable_thinking=True) == thinking


def test_truncation_keeps_the_prefix_of_ids_and_mask():
    tok = smollm2_tokenizer()
    full = tokenize_conversation(tok, TWO_TURNS, 4096)
    first_masked = full["loss_mask"].index(1)
    cut = first_masked + 3
    short = tokenize_conversation(tok, TWO_TURNS, cut)
    assert short["input_ids"] == full["input_ids"][:cut]
    assert short["loss_mask"] == full["loss_mask"][:cut]
    assert sum(short["loss_mask"]) == 3


def test_conversation_without_assistant_turn_has_empty_mask():
    tok = smollm2_tokenizer()
    result = tokenize_conversation(tok, TWO_TURNS[:1], 4096)
    assert len(result["input_ids"]) > 0 and not any(result["loss_mask"])


def test_slow_tokenizer_path_matches_offsets_path():
    tok = smollm2_tokenizer()

    class NoOffsets:
        is_fast = False

        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, text, **kwargs):
            assert not kwargs.get("return_offsets_mapping")
            return tok(text, **kwargs)

    fast = tokenize_conversation(tok, TWO_TURNS, 4096)
    slow = tokenize_conversation(NoOffsets(), TWO_TURNS, 4096)
    assert slow == fast


def test_errors_name_the_problem():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_conversation(tok, TWO_TURNS, 64)
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        tokenize_conversation(tok, TWO_TURNS, 64, chat_template="vicuna")
    with pytest.raises(ValueError, match="message 1: role must be"):
        tokenize_conversation(tok, [TWO_TURNS[0], {"role": "tool", "content": "x"}], 64, chat_template="chatml")
    with pytest.raises(ValueError, match="max_length must be positive"):
        tokenize_conversation(tok, TWO_TURNS, 0, chat_template="chatml")
    no_prompt = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="no usable assistant header"):
        tokenize_conversation(tok, TWO_TURNS, 64, chat_template=no_prompt)
