"""Chat-template rendering and the assistant loss mask.

The conversation is rendered with the tokenizer's own chat template (or one given by name or as Jinja text), so the
training text is byte-for-byte what the target sees when it serves. The loss mask is found on the rendered text and
mapped to tokens through the fast tokenizer's offsets:

* the assistant header is what the template appends for ``add_generation_prompt=True`` (for templates without a
  generation prompt, what it writes between a user message and the assistant content): it is prompt, never
  generated, so it is masked out. With ``enable_thinking=False`` Qwen3's pre-filled empty
  ``<think>\n\n</think>\n\n`` is part of it, as is the ``<think>\n`` R1-style templates pre-fill;
* the end-of-turn marker is what the template writes right after an assistant message's content (``<|eot_id|>``,
  ``<|im_end|>``): the model generates it to stop, so it is masked in, while the newline after it is not;
* everything between the two, a ``<think>...</think>`` block included, is assistant output.

These are SpecForge's semantics (header out; content and end-of-turn token in), with the markers read off the
template instead of a hand-kept registry. Templates that rewrite assistant content (Llama 3 trims it, Qwen3 drops
reasoning from earlier turns) are handled because spans are found on the rendered text, not on the input strings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .formats import fold_reasoning

# Built-in templates, by name, in the exact formats of the model families (tools and multimodal parts left out);
# see resolve_chat_template for when a name renders with them.
LLAMA3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.index0 == 0 %}{{- bos_token }}{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Qwen2 / Qwen2.5: ChatML with a default system prompt.
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Plain ChatML, no default system prompt.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3: ChatML; reasoning is kept only for assistant turns after the last user query, the last assistant turn always
# carries a <think> block, and enable_thinking=False pre-fills an empty one in the generation prompt.
QWEN3_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(found=false, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- if not ns.found and message['role'] == 'user' %}"
    "{%- set ns.found = true %}{%- set ns.last_query_index = (messages|length - 1) - loop.index0 %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

CHAT_TEMPLATES = {
    "llama3": LLAMA3_TEMPLATE,
    "qwen": QWEN2_TEMPLATE,
    "qwen2": QWEN2_TEMPLATE,
    "chatml": CHATML_TEMPLATE,
    "qwen3": QWEN3_TEMPLATE,
    "qwen3-thinking": QWEN3_TEMPLATE,
    "qwen3-instruct": QWEN3_TEMPLATE,
}
# enable_thinking a name implies when the caller leaves it None (SpecForge's qwen3-thinking / qwen3-instruct).
TEMPLATE_THINKING = {"qwen3-thinking": True, "qwen3-instruct": False}

_PROBE_USER = "specforge-probe-user-7c1e"
_PROBE_ASSISTANT = "specforge-probe-assistant-9b4d"

logger = logging.getLogger(__name__)
_WARNED: set[tuple[str, str]] = set()


def _own_template(tokenizer) -> str | None:
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):
        own = own.get("default")
    return own or None


def resolve_chat_template(
    tokenizer, chat_template: str | None, enable_thinking: bool | None = None
) -> tuple[str, bool | None]:
    """-> (Jinja template to render with, enable_thinking).

    None: the tokenizer's own template. Jinja text: that template. A name (CHAT_TEMPLATES) works like SpecForge's
    --chat-template: it names the family, and the tokenizer's own template still renders when it has one, because
    that is what the server formats prompts with; the built-in template is used only for tokenizers without one. A
    name can imply enable_thinking (TEMPLATE_THINKING) when the caller leaves it None.
    """
    own = _own_template(tokenizer)
    if chat_template is None:
        if own is None:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; pass chat_template= "
                f"as one of {sorted(CHAT_TEMPLATES)} or as Jinja text"
            )
        return own, enable_thinking
    if chat_template in CHAT_TEMPLATES:
        if enable_thinking is None:
            enable_thinking = TEMPLATE_THINKING.get(chat_template)
        if own is None:
            return CHAT_TEMPLATES[chat_template], enable_thinking
        named = template_markers(tokenizer, CHAT_TEMPLATES[chat_template], enable_thinking)
        used = template_markers(tokenizer, own, enable_thinking)
        if named.headers[0] != used.headers[0] and (chat_template, own) not in _WARNED:
            _WARNED.add((chat_template, own))
            logger.warning(
                "chat template %r expects assistant header %r, but the tokenizer's own template (used) writes %r",
                chat_template,
                named.headers[0],
                used.headers[0],
            )
        return own, enable_thinking
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template, enable_thinking
    raise ValueError(f"unknown chat template {chat_template!r}: use one of {sorted(CHAT_TEMPLATES)} or Jinja text")


@dataclass(frozen=True)
class TemplateMarkers:
    # Candidate assistant headers, preferred first; later ones are shorter prefixes of the first, for turns the
    # template renders without the pre-filled part (Qwen3's empty think block, R1-style "<think>\n").
    headers: tuple[str, ...]
    # End-of-turn text written right after assistant content, masked in; "" if the template writes none.
    end_of_turn: str


_MARKERS_CACHE: dict[tuple, TemplateMarkers] = {}


def _render(tokenizer, messages, template: str, add_generation_prompt: bool, enable_thinking: bool | None) -> str:
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def _generation_header(tokenizer, template: str, enable_thinking: bool | None) -> str:
    user = [{"role": "user", "content": _PROBE_USER}]
    with_prompt = _render(tokenizer, user, template, True, enable_thinking)
    without = _render(tokenizer, user, template, False, enable_thinking)
    if with_prompt.startswith(without) and len(with_prompt) > len(without):
        return with_prompt[len(without) :]
    if with_prompt == without:
        # Templates without a generation prompt (Mistral, Llama 2: "[INST] q [/INST]answer</s>"): the header is
        # whatever the template writes between a user message and the assistant content.
        pair = user + [{"role": "assistant", "content": _PROBE_ASSISTANT}]
        rendered = _render(tokenizer, pair, template, False, enable_thinking)
        user_end = rendered.find(_PROBE_USER) + len(_PROBE_USER)
        assistant_start = rendered.find(_PROBE_ASSISTANT, user_end)
        if user_end >= len(_PROBE_USER) and assistant_start > user_end:
            return rendered[user_end:assistant_start]
    raise ValueError(
        "chat template has no usable assistant header: neither add_generation_prompt=True nor an assistant message "
        f"adds text after a user message (plain rendering ends {without[-40:]!r}, with prompt {with_prompt[-60:]!r})"
    )


def template_markers(tokenizer, template: str, enable_thinking: bool | None = None) -> TemplateMarkers:
    """Read the assistant header and end-of-turn marker off `template` by rendering probe conversations."""
    key = (template, enable_thinking, tokenizer.bos_token, tokenizer.eos_token)
    cached = _MARKERS_CACHE.get(key)
    if cached is not None:
        return cached
    header = _generation_header(tokenizer, template, enable_thinking)
    headers = [header]
    for alt_thinking in (None, True):
        if alt_thinking == enable_thinking:
            continue
        alt = _generation_header(tokenizer, template, alt_thinking)
        if alt != header and header.startswith(alt) and alt not in headers:
            headers.append(alt)
    for h in list(headers):
        # Reasoning templates that pre-fill "<think>\n" in the generation prompt (DeepSeek-R1, QwQ, Qwen3-2507
        # thinking) render earlier turns without it.
        if "<think>" in h and h[: h.index("<think>")] not in headers and h.index("<think>") > 0:
            headers.append(h[: h.index("<think>")])
    pair = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ASSISTANT}]
    rendered = _render(tokenizer, pair, template, False, enable_thinking)
    at = rendered.rfind(_PROBE_ASSISTANT)
    if at < 0:
        raise ValueError("chat template does not render assistant message content verbatim")
    after = rendered[at + len(_PROBE_ASSISTANT) :].strip()
    end_of_turn = after.split("\n", 1)[0].strip()
    markers = TemplateMarkers(headers=tuple(headers), end_of_turn=end_of_turn)
    _MARKERS_CACHE[key] = markers
    return markers


def _find_content(text: str, content: str, start: int) -> tuple[int, int] | None:
    for candidate in (content, content.strip(), content.split("</think>")[-1].strip()):
        if candidate:
            at = text.find(candidate, start)
            if at >= 0:
                return at, at + len(candidate)
    return None


def assistant_spans(text: str, messages: list[dict], markers: TemplateMarkers) -> list[tuple[int, int]]:
    """Character spans [start, end) of assistant output (content + end-of-turn) in the rendered `text`."""
    spans = []
    cursor = 0
    for i, msg in enumerate(messages):
        content = msg["content"]
        if msg["role"] != "assistant":
            # Moving past user text keeps a header quoted inside a user message from being taken for a real one.
            found = _find_content(text, content, cursor)
            if found is not None:
                cursor = found[1]
            continue
        best_at, best_header = -1, ""
        for header in markers.headers:
            at = text.find(header, cursor)
            if at >= 0 and (best_at < 0 or at < best_at or (at == best_at and len(header) > len(best_header))):
                best_at, best_header = at, header
        if best_at < 0:
            raise ValueError(
                f"assistant message {i}: header {markers.headers[0]!r} not found in the rendered conversation"
            )
        start = best_at + len(best_header)
        end = text.find(markers.end_of_turn, start) if markers.end_of_turn else -1
        if end >= 0:
            end += len(markers.end_of_turn)
        else:
            found = _find_content(text, content, start)
            if found is None:
                raise ValueError(f"assistant message {i}: its content was not found in the rendered conversation")
            end = found[1]
        spans.append((start, end))
        cursor = end
    return spans


def _token_bounds_slow(tokenizer, text: str, positions: list[int]) -> list[int]:
    # Without offsets: the token index of a character position is the length of the encoded prefix.
    return [len(tokenizer(text[:p], add_special_tokens=False)["input_ids"]) for p in positions]


def render_conversation(
    tokenizer, messages: list[dict], chat_template: str | None = None, enable_thinking: bool | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """-> (rendered text, character spans [start, end) of assistant output), see assistant_spans."""
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: role must be system, user or assistant, got {msg!r:.80}")
        if not isinstance(msg.get("content"), str):
            raise ValueError(f"message {i}: content must be a string")
    template, enable_thinking = resolve_chat_template(tokenizer, chat_template, enable_thinking)
    markers = template_markers(tokenizer, template, enable_thinking)
    clean = [
        {"role": m["role"], "content": fold_reasoning(m["content"], m.get("reasoning_content"))}
        if m["role"] == "assistant"
        else {"role": m["role"], "content": m["content"]}
        for m in messages
    ]
    text = _render(tokenizer, clean, template, False, enable_thinking)
    return text, assistant_spans(text, clean, markers)


def _mask_from_offsets(offsets, spans: list[tuple[int, int]]) -> list[int]:
    # Tokens and spans are both sorted by position: one sweep. A token counts if it overlaps a span.
    mask = [0] * len(offsets)
    s = 0
    for t, (tok_start, tok_end) in enumerate(offsets):
        while s < len(spans) and spans[s][1] <= tok_start:
            s += 1
        if s == len(spans):
            break
        if tok_end > spans[s][0] and tok_end > tok_start:
            mask[t] = 1
    return mask


def _mask_without_offsets(tokenizer, text: str, spans: list[tuple[int, int]], n_tokens: int) -> list[int]:
    mask = [0] * n_tokens
    bounds = _token_bounds_slow(tokenizer, text, [p for span in spans for p in span])
    for start, end in zip(bounds[0::2], bounds[1::2]):
        for t in range(start, min(end, n_tokens)):
            mask[t] = 1
    return mask


def tokenize_rendered(tokenizer, rendered: list[tuple[str, list[tuple[int, int]]]], max_length: int) -> list[dict]:
    """Tokenize render_conversation outputs in one batch (the Rust tokenizer spreads a batch over threads)."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if not rendered:
        return []
    texts = [text for text, _ in rendered]
    fast = tokenizer.is_fast
    enc = tokenizer(
        texts, add_special_tokens=False, truncation=True, max_length=max_length, return_offsets_mapping=fast
    )
    out = []
    for k, (text, spans) in enumerate(rendered):
        ids = list(enc["input_ids"][k])
        if fast:
            mask = _mask_from_offsets(enc["offset_mapping"][k], spans)
        else:
            mask = _mask_without_offsets(tokenizer, text, spans, len(ids))
        out.append({"input_ids": ids, "loss_mask": mask})
    return out


def tokenize_conversation(
    tokenizer,
    messages: list[dict],
    max_length: int,
    chat_template: str | None = None,
    enable_thinking: bool | None = None,
) -> dict:
    """Render and tokenize one conversation; returns {"input_ids": list[int], "loss_mask": list[int]}.

    loss_mask is 1 on the tokens the assistant generates (content, reasoning, end-of-turn token) and 0 on system/user
    turns and template scaffolding. Both lists are truncated to the first `max_length` tokens.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    rendered = render_conversation(tokenizer, messages, chat_template, enable_thinking)
    return tokenize_rendered(tokenizer, [rendered], max_length)[0]
