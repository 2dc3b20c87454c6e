"""The target wrapper captures layer outputs exactly as output_hidden_states numbers them (hidden_states[i + 1])."""

import pytest
import torch

from specforge.target import TargetModel, TargetModelError


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_aux_hidden_states_are_layer_outputs(family):
    import transformers

    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(hidden_size=64, intermediate_size=96, num_hidden_layers=8, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=120, head_dim=16)).eval()
    target = TargetModel(model)
    assert target.aux_layer_ids == [1, 3, 4]  # [1, N//2-1, N-4]
    ids = torch.randint(0, 120, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    out = target(ids, mask)
    torch.testing.assert_close(out.aux_hidden, torch.cat([ref.hidden_states[i + 1] for i in (1, 3, 4)], -1))
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.logits, out.last_hidden @ model.lm_head.weight.T, rtol=1e-5, atol=1e-5)
    lean = target(ids, mask, with_logits=False)  # offline capture runs the decoder only
    assert lean.logits is None
    torch.testing.assert_close(lean.last_hidden, out.last_hidden)
    torch.testing.assert_close(lean.aux_hidden, out.aux_hidden)
    torch.testing.assert_close(target.embed(ids), model.get_input_embeddings()(ids))


def test_bad_aux_layers_are_named():
    import transformers

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, vocab_size=50))
    with pytest.raises(TargetModelError, match=r"\[7\] are outside the target's 4 layers"):
        TargetModel(model, aux_layer_ids=[0, 1, 7])
    with pytest.raises(TargetModelError, match="not found"):
        TargetModel.from_pretrained("/nonexistent/model.gguf")
