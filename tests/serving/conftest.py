import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from serving.models.loader import load_target, resolve_model_path, target_from_hf_model


class IdTokenizer:
    """Tokenizer stand-in for tiny random targets: text is the ids joined by spaces."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


def tiny_hf_model(arch: str = "llama", vocab: int = 256, layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=1024,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=32, tie_word_embeddings=False))
    else:
        raise ValueError(arch)
    # Random init leaves biases / norms at trivial values; perturb them so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_target(arch="llama", vocab=256, layers=4, seed=0):
    hf = tiny_hf_model(arch, vocab, layers, seed)
    return hf, target_from_hf_model(hf, IdTokenizer())


@pytest.fixture(scope="session")
def smollm2_folder():
    folder, _ = resolve_model_path(None)
    return folder


@pytest.fixture(scope="session")
def smollm2_target(smollm2_folder):
    return load_target(None, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_folder):
    return AutoModelForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32).eval()


def chat_prompt(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos=True) -> list[int]:
    kwargs = {} if eos else {"eos_token_id": None}
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs
    )
    return out[0, len(prompt) :].tolist()
