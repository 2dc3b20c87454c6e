"""How far bf16 greedy decoding of the target follows rounding noise: the pure torch path against itself with its
attention arithmetic in fp64 instead of fp32 (a change far below bf16 precision), under three numerics.

    python benchmarks/bf16_noise_floor.py --out bf16_noise_floor.json [--device cuda]

- default: the engine as it serves (bf16 weights, activations, residual stream and logits);
- fp32 logits: the LM head's product returned in fp32 instead of rounded to bf16;
- fp32 logits + fp32 residual: also the residual stream kept in fp32 (each layer's input still rounded to bf16).

For each, the number of prompts (MT-Bench first turns, greedy, first 32 tokens) whose output is the same with fp32
and with fp64 attention, and where the others first differ. An implementation can agree with the torch path only
about as often as the torch path agrees with itself here. Runs on the CPU (a few minutes) or on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import _compare  # noqa: E402


def _fp32_logits(model) -> None:
    weight = model.lm_head.weight.float()
    model.compute_logits = lambda hidden: F.linear(hidden.float(), weight)


def _fp32_residual_forward(self, fb):
    """The torch path of LlamaForCausalLM.forward with the residual stream in fp32 (no aux hidden states)."""
    h = self.embed_tokens(fb.input_ids)
    dtype = h.dtype
    residual = h.float()
    for i, layer in enumerate(self.layers):
        if i > 0:
            residual = residual + h.float()
        x = layer.self_attn(layer.input_layernorm(residual).to(dtype), fb.positions, fb, self.rotary, fb.attn_backend)
        residual = residual + x.float()
        h = layer.mlp(layer.post_attention_layernorm(residual).to(dtype))
    return self.norm(residual + h.float()).to(dtype), None


def run(numerics: str, attention_dtype: torch.dtype, prompts, device: str) -> list[list[int]]:
    from serving.config import EngineConfig
    from serving.engine import Engine
    from serving.sampling import SamplingParams

    engine = Engine(
        EngineConfig(device=device, dtype="bfloat16", max_running_requests=8, max_total_tokens=16384,
                     attention_backend="torch", disable_cuda_graph=True)
    )  # fmt: skip
    model = engine.runner.model
    model.fused_kernels = False
    engine.runner.backend.compute_dtype = attention_dtype
    if numerics != "default":
        _fp32_logits(model)
    if numerics == "fp32 logits + fp32 residual":
        model.forward = types.MethodType(_fp32_residual_forward, model)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    return [r.output_ids for r in engine.generate(prompts, params)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bf16_noise_floor.json")
    p.add_argument("--num-prompts", type=int, default=20)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from serving.bench import load_prompts
    from serving.models.loader import resolve_model_path

    folder, _ = resolve_model_path(None)
    prompts = load_prompts("mtbench", args.num_prompts, AutoTokenizer.from_pretrained(str(folder)))
    report = {"device": args.device, "prompts": len(prompts), "tokens": 32, "results": {}}
    for numerics in ("default", "fp32 logits", "fp32 logits + fp32 residual"):
        a = run(numerics, torch.float32, prompts, args.device)
        b = run(numerics, torch.float64, prompts, args.device)
        c = report["results"][numerics] = _compare(a, b)
        print(
            f"{numerics:<30} fp32 vs fp64 attention: {c['identical']}/{len(prompts)} identical; first differences at "
            f"{c['first_difference_at']}"
        )
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
