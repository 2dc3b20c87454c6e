"""The EAGLE-3 training loop (online: target in the loop; offline: precomputed hidden states), read top to bottom.

Parallelism: plain data parallelism over `torchrun` ranks, the draft wrapped by FSDP2 (`fully_shard`, default) or
DeepSpeed ZeRO-2. Data order is a deterministic function of (seed, epoch): each global batch of
world_size * batch_size samples is padded to its longest sequence and split by rank, so a run on N ranks sees
exactly the batches a run on one rank with N times the batch size sees.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from specbundle.checkpoint import load_draft, save_draft
from specbundle.config import DraftConfig, DraftConfigError
from specbundle.modeling import Eagle3DraftModel
from specforge import train_state
from specforge.args import DEFAULT_DRAFT_VOCAB, TrainArgs
from specforge.core import Eagle3TrainModule, accept_length, prepare_targets, weighted_loss
from specforge.hidden_states import HiddenStatesDataset
from specforge.target import TargetModel, load_tokenizer, resolve_dtype
from specforge.vocab import remap_lm_head


# ----------------------------------------------------------------------------------------------- distributed
class Dist:
    def __init__(self, device: str | None, timeout_min: int = 20, gpus_per_rank: int = 1):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if kind == "cuda":
            first = self.local_rank * gpus_per_rank
            if first + gpus_per_rank > torch.cuda.device_count():
                raise RuntimeError(f"local rank {self.local_rank} needs GPUs {first}..{first + gpus_per_rank - 1} but "
                                   f"only {torch.cuda.device_count()} are visible (nproc_per_node x "
                                   f"--target-gpus-per-rank must fit)")
            torch.cuda.set_device(first)
            self.device = torch.device("cuda", first)
            self.gpus = list(range(first, first + gpus_per_rank))
        else:
            self.device = torch.device(kind)
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(minutes=timeout_min),
                                    device_id=self.device if self.device.type == "cuda" else None)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- schedule
def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR factor after `s` optimizer steps: (s+1)/W during warmup, then cosine from 1 to 0 over the rest."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(s - warmup_steps, span) / span))

    return factor


# ----------------------------------------------------------------------------------------------- data
def load_token_dataset(path: str, tokenizer_path: str | None, args: TrainArgs):
    """Tokenized rows (input_ids, loss_mask): a datasets folder as is, or a normalized JSONL built on the fly."""
    import datasets

    p = Path(path)
    if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "state.json").is_file()):
        ds = datasets.load_from_disk(str(p))
    elif p.is_file():
        from specforge.data.dataset import build_dataset

        if tokenizer_path is None:
            raise ValueError("tokenizing a JSONL needs the target's tokenizer: give --target-model-path")
        tokenizer = load_tokenizer(tokenizer_path)
        ds = build_dataset(str(p), tokenizer, args.max_length, chat_template=args.chat_template,
                           num_proc=args.build_dataset_num_proc, cache_dir=args.cache_dir)
    else:
        raise FileNotFoundError(f"training data not found: {path} (a JSONL file or a tokenized dataset folder)")
    missing = {"input_ids", "loss_mask"} - set(ds.column_names)
    if missing:
        raise ValueError(f"dataset {path} lacks column(s) {sorted(missing)}; expected input_ids and loss_mask")
    return ds


class TokenRows:
    """Online rows: dataset -> (input_ids, loss_mask) tensors, truncated to max_length."""

    def __init__(self, ds, max_length: int):
        import pyarrow.compute as pc

        self.ds, self.max_length = ds, max_length
        raw = []
        for batch in ds.with_format("arrow").iter(batch_size=8192):
            raw += pc.list_value_length(batch["input_ids"]).to_pylist()
        self.lengths = [min(n, max_length) for n in raw]
        self.truncates = any(n > max_length for n in raw)
        if any(n == 0 for n in self.lengths):
            raise ValueError(f"dataset row {self.lengths.index(0)} has no tokens")

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.ds[int(i)]
        ids = torch.as_tensor(row["input_ids"][: self.max_length], dtype=torch.long)
        mask = torch.as_tensor(row["loss_mask"][: self.max_length], dtype=torch.long)
        if ids.shape != mask.shape:
            raise ValueError(f"dataset row {i}: input_ids ({ids.numel()}) and loss_mask ({mask.numel()}) "
                             f"differ in length")
        return {"input_ids": ids, "loss_mask": mask}

    def tokens(self, i: int) -> dict[str, list[int]]:
        row = self[i]
        return {"input_ids": row["input_ids"].tolist(), "loss_mask": row["loss_mask"].tolist()}

    def loss_masks(self):
        """Every row's loss mask (truncated to max_length), read a column batch at a time."""
        for batch in self.ds.select_columns(["loss_mask"]).with_format("arrow").iter(batch_size=8192):
            for mask in batch["loss_mask"].to_pylist():
                yield mask[: self.max_length]


class HiddenRows:
    """Offline rows, truncated to max_length."""

    def __init__(self, ds: HiddenStatesDataset, max_length: int):
        self.ds, self.max_length = ds, max_length
        self.lengths = [min(n, max_length) for n in ds.lengths]

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[: self.max_length] for k, v in self.ds[int(i)].items()}

    def tokens(self, i: int) -> dict[str, list[int]]:
        t = self.ds.tokens(int(i))
        return {k: v[: self.max_length] for k, v in t.items()}

    def loss_masks(self):
        for i in range(len(self)):
            yield self.tokens(i)["loss_mask"]


def cap_answer_tokens(loss_mask: torch.Tensor, n: int) -> torch.Tensor:
    """loss_mask [T] with each run of ones (an assistant turn) cut to its first n positions."""
    m = loss_mask.bool()
    idx = torch.arange(m.numel())
    starts = m & ~F.pad(m, (1, 0))[:-1]
    run_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(0).values
    return (m & (idx - run_start < n)).to(loss_mask.dtype)


class CappedAnswerRows:
    """Rows whose loss covers only the first n tokens of each assistant turn (--max-answer-tokens). A row ends one
    token after its last scored position s: TTT step i scores position p where p + i is a loss position, reading
    x_{p+i+1} and the target's logits at p + i + 1, so nothing past s + 1 is read (attention is causal). The cut
    drops no scored position, only the compute of the unscored tail."""

    def __init__(self, rows, n: int):
        self.rows, self.n = rows, n
        self.lengths = [self._keep(cap_answer_tokens(torch.as_tensor(m), n)) for m in rows.loss_masks()]

    @staticmethod
    def _keep(capped: torch.Tensor) -> int:
        hits = capped.nonzero()
        if hits.numel() == 0:
            return capped.numel()
        return min(capped.numel(), int(hits[-1]) + 2)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = dict(self.rows[i])
        row["loss_mask"] = cap_answer_tokens(row["loss_mask"], self.n)
        keep = self.lengths[i]
        return {k: v[:keep] for k, v in row.items()}

    def tokens(self, i: int) -> dict[str, list[int]]:
        return {k: v.tolist() for k, v in self[i].items() if k in ("input_ids", "loss_mask")}


class Subset:
    def __init__(self, rows, indices: list[int]):
        self.rows, self.indices = rows, indices
        self.lengths = [rows.lengths[i] for i in indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.rows[self.indices[i]]

    def tokens(self, i: int):
        return self.rows.tokens(self.indices[i])


def holdout_split(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, eval) index split; holdout < 1 is a fraction, >= 1 a count."""
    count = int(holdout) if holdout >= 1 else int(n * holdout)
    count = min(count, n - 1) if count > 0 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return sorted(perm[count:]), sorted(perm[:count])


# Length grouping: sort each run of LENGTH_GROUP_BATCHES global batches of the shuffled order by length (as
# transformers' group_by_length does with its mega-batches of 50), so that a batch pads its rows to similar lengths.
LENGTH_GROUP_BATCHES = 50


def epoch_batches(n: int, global_batch: int, seed: int, epoch: int, shuffle: bool = True,
                  lengths: list[int] | None = None) -> list[list[int]]:
    """Global batches of one epoch; training drops the remainder so every rank runs the same number of steps.

    With lengths (training with --group-by-length), rows of similar lengths share batches, and the batches come in
    shuffled order. Without shuffling (evaluation) the last batch is filled with -1 (dummy rows that count for
    nothing).
    """
    if shuffle:
        gen = torch.Generator().manual_seed(seed * 100003 + epoch)
        order = torch.randperm(n, generator=gen).tolist()
        if lengths is not None:
            mega = global_batch * LENGTH_GROUP_BATCHES
            order = [i for k in range(0, n, mega) for i in sorted(order[k:k + mega], key=lambda i: -lengths[i])]
        batches = [order[k * global_batch:(k + 1) * global_batch] for k in range(n // global_batch)]
        if lengths is not None:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return batches
    order = list(range(n)) + [-1] * (-n % global_batch)
    return [order[k:k + global_batch] for k in range(0, len(order), global_batch)]


def collate(rows, indices: list[int], pad_to: int) -> dict[str, torch.Tensor]:
    """Right-pad this rank's rows to `pad_to` (the global batch's longest): [B, T] masks and ids, [B, T, *] states."""
    items = []
    for i in indices:
        item = rows[0 if i < 0 else i]
        if i < 0:
            item = dict(item, loss_mask=torch.zeros_like(item["loss_mask"]))
        items.append(item)
    out = {}
    for key in items[0]:
        padded = []
        for it in items:
            x = it[key]
            pad = pad_to - x.shape[0]
            padded.append(F.pad(x, (0, 0) * (x.dim() - 1) + (0, pad)) if pad else x)
        out[key] = torch.stack(padded)
    out["attention_mask"] = torch.stack(
        [(torch.arange(pad_to) < it["input_ids"].shape[0]).long() for it in items])
    return out


# ----------------------------------------------------------------------------------------------- model
def build_draft_config(args: TrainArgs, target_config: dict, vocab_size: int) -> DraftConfig:
    if args.draft_model_config:
        cfg = DraftConfig.from_file(args.draft_model_config)
    elif args.ckpt_dir:
        cfg = DraftConfig.from_file(args.ckpt_dir)
        wanted = args.draft_vocab_size
        if wanted is not None and min(wanted, vocab_size) != cfg.effective_draft_vocab_size:
            cfg.draft_vocab_size = wanted if wanted < vocab_size else None
    else:
        cfg = DraftConfig.for_target(target_config, draft_vocab_size=min(args.draft_vocab_size or DEFAULT_DRAFT_VOCAB,
                                                                          vocab_size), aux_layer_ids=args.aux_layer_ids)
    if cfg.aux_layer_ids is None:
        cfg.aux_layer_ids = cfg.resolved_aux_layer_ids(int(target_config["num_hidden_layers"]))
    if args.aux_layer_ids is not None and list(args.aux_layer_ids) != list(cfg.aux_layer_ids):
        raise DraftConfigError(f"--aux-layer-ids {args.aux_layer_ids} disagree with the draft config's "
                               f"{cfg.aux_layer_ids}")
    if cfg.vocab_size != vocab_size:
        raise DraftConfigError(f"draft config 'vocab_size' is {cfg.vocab_size} but the target's is {vocab_size}")
    if cfg.target_hidden_size != int(target_config["hidden_size"]):
        raise DraftConfigError(f"draft config 'target_hidden_size' is {cfg.target_hidden_size} but the target's "
                               f"hidden size is {target_config['hidden_size']}")
    return cfg


def vocab_mapping(rows, vocab_size: int, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t [Vd] int64, t2d [V] bool) from the training data's token frequencies (specforge.vocab)."""
    if draft_vocab_size >= vocab_size:
        return torch.zeros(vocab_size, dtype=torch.int64), torch.ones(vocab_size, dtype=torch.bool)
    import datasets

    from specforge.vocab import build_vocab_mapping, count_tokens

    base = rows.rows if isinstance(rows, Subset) else rows
    if isinstance(getattr(base, "ds", None), datasets.Dataset):
        token_ds = base.ds.select(rows.indices) if isinstance(rows, Subset) else base.ds
        if base.truncates:  # count what training sees
            n = base.max_length
            token_ds = token_ds.map(lambda r: {"input_ids": r["input_ids"][:n], "loss_mask": r["loss_mask"][:n]})
    else:
        token_ds = datasets.Dataset.from_list([rows.tokens(i) for i in range(len(rows))])
    d2t, t2d = build_vocab_mapping(count_tokens(token_ds, vocab_size), vocab_size, draft_vocab_size)
    return torch.as_tensor(d2t, dtype=torch.int64), torch.as_tensor(t2d, dtype=torch.bool)


def draft_state(module) -> dict[str, torch.Tensor]:
    """Full (unsharded) state of the wrapped Eagle3TrainModule on CPU, keys as checkpoint keys (rank 0 only)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if hasattr(module, "module") and not isinstance(module, Eagle3TrainModule):  # DeepSpeed engine
        sd = module.module.state_dict()
    elif dist.is_initialized():
        sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = module.state_dict()
    return {k.removeprefix("draft."): (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
            for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, args: TrainArgs):
        self.args = args
        self.dist = Dist(args.device, args.dist_timeout, args.target_gpus_per_rank)
        self.device = self.dist.device
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.out = Path(args.output_dir)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        self._build_data_and_target()
        self._build_model()
        self.global_batch = self.dist.world * args.batch_size
        steps_per_epoch = len(self.train_rows) // self.global_batch // args.draft_accumulation_steps
        if steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_rows)} training samples are fewer than one optimizer step needs "
                             f"({self.global_batch * args.draft_accumulation_steps}: world size x batch size x "
                             f"accumulation)")
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = args.total_steps or args.num_epochs * steps_per_epoch
        # --max-num-steps below --total-steps is a deliberate pause (resumable); running out of epochs is not.
        epochs_end = args.num_epochs * steps_per_epoch
        if epochs_end < min(self.total_steps, args.max_num_steps or self.total_steps):
            self._log(f"warning: training ends at step {epochs_end} (--num-epochs {args.num_epochs} x "
                      f"{steps_per_epoch} steps per epoch), before --total-steps {self.total_steps}: the learning "
                      f"rate will not have decayed to zero")
        self._build_optimizer()
        self.global_step, self.epoch, self.micro_in_epoch = 0, 0, 0
        self.resumed_from = None
        if args.resume:
            self._resume()
        self.writer = None
        if self.dist.is_main and args.report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("--report-to tensorboard needs the tensorboard package (pip install tensorboard); "
                                   "or pass --report-to none") from e
            self.writer = SummaryWriter(str(self.out / "runs"))

    # -- setup
    def _build_data_and_target(self):
        args = self.args
        self.target = None
        if args.is_online:
            target_path = args.target_model_path or _default_target()
            self.target_path = target_path
            split = {}
            if args.target_gpus_per_rank > 1 and self.device.type == "cuda":
                split = {"device_map": "auto", "max_memory": {
                    g: int(torch.cuda.get_device_properties(g).total_memory * 0.8) for g in self.dist.gpus}}
            self.target = TargetModel.from_pretrained(target_path, dtype=self.dtype, device=self.device,
                                                      aux_layer_ids=self._aux_ids_hint(), **split)
            self.target_config = self.target.config_dict()
            self.vocab_size = self.target.vocab_size
            # rank 0 tokenizes first so the others hit the datasets cache
            if not self.dist.is_main:
                self.dist.barrier()
            train = TokenRows(load_token_dataset(args.train_data_path, target_path, args), args.max_length)
            evals = TokenRows(load_token_dataset(args.eval_data_path, target_path, args), args.max_length) \
                if args.eval_data_path else None
            if self.dist.is_main:
                self.dist.barrier()
        else:
            hs = HiddenStatesDataset(args.train_hidden_states_path)
            self.target_path = hs.meta.get("target_model_path")
            self.target_config = hs.meta["target_config"]
            head = hs.head()
            self.lm_head = head["lm_head.weight"].to(self.device, self.dtype)
            self.embed_tokens = head["embed_tokens.weight"].to(self.device, self.dtype)
            self.vocab_size = self.lm_head.shape[0]
            self.offline_aux_ids = hs.meta["aux_layer_ids"]
            train = HiddenRows(hs, args.max_length)
            evals = HiddenRows(HiddenStatesDataset(args.eval_hidden_states_path), args.max_length) \
                if args.eval_hidden_states_path else None
        if args.max_answer_tokens:
            train = CappedAnswerRows(train, args.max_answer_tokens)
            evals = CappedAnswerRows(evals, args.max_answer_tokens) if evals is not None else None
        if evals is None and args.eval_holdout > 0:
            train_idx, eval_idx = holdout_split(len(train), args.eval_holdout, args.seed)
            train, evals = Subset(train, train_idx), Subset(train, eval_idx)
        self.train_rows, self.eval_rows = train, evals

    def _aux_ids_hint(self):
        args = self.args
        if args.aux_layer_ids is not None:
            return list(args.aux_layer_ids)
        for path in (args.draft_model_config, args.ckpt_dir):
            if path:
                return DraftConfig.from_file(path).aux_layer_ids
        return None

    def _load_remapped(self, draft: Eagle3DraftModel, src: Eagle3DraftModel) -> None:
        """Start from `src` with this run's draft vocabulary (from the training data): every weight but the lm_head
        as is; lm_head rows of tokens in both vocabularies copied, the others mapped from the target's lm_head."""
        cfg = draft.config
        d2t, t2d = vocab_mapping(self.train_rows, cfg.vocab_size, cfg.effective_draft_vocab_size)
        draft.d2t.copy_(d2t)
        draft.t2d.copy_(t2d)
        state = {k: v for k, v in src.state_dict().items() if not k.startswith(("lm_head.", "d2t", "t2d"))}
        draft.load_state_dict(state, strict=False)
        target_head = self.target.lm_head_weight() if self.target is not None else self.lm_head  # [V, Ht]
        src_head = src.lm_head.weight if src.lm_head is not None else None
        new_ids = torch.arange(draft.draft_vocab_size) + d2t
        src_ids = torch.arange(src.draft_vocab_size) + src.d2t
        weight, report = remap_lm_head(src_head, src_ids, new_ids, target_head.detach().float().cpu())
        with torch.no_grad():
            draft.lm_head.weight.copy_(weight)
        self._log(f"draft vocabulary {src.draft_vocab_size} -> {draft.draft_vocab_size}: {report}")

    def _build_model(self):
        args = self.args
        cfg = build_draft_config(args, self.target_config, self.vocab_size)
        if not args.is_online and list(cfg.aux_layer_ids) != list(self.offline_aux_ids):
            raise DraftConfigError(f"the draft wants aux layers {cfg.aux_layer_ids} but the hidden states were "
                                   f"captured at {self.offline_aux_ids}")
        if args.max_length > cfg.max_position_embeddings:
            raise DraftConfigError(f"--max-length {args.max_length} exceeds the draft's max_position_embeddings "
                                   f"({cfg.max_position_embeddings})")
        self.draft_config = cfg
        torch.manual_seed(args.seed)  # identical initialization on every rank
        draft = Eagle3DraftModel(cfg)
        if args.ckpt_dir:
            src = load_draft(args.ckpt_dir, dtype=torch.float32)
            if src.draft_vocab_size == draft.draft_vocab_size:
                draft.load_state_dict(src.state_dict(), strict=False)
            else:
                self._load_remapped(draft, src)
        else:
            d2t, t2d = vocab_mapping(self.train_rows, cfg.vocab_size, cfg.effective_draft_vocab_size)
            draft.d2t.copy_(d2t)
            draft.t2d.copy_(t2d)
        if args.resume:
            latest = train_state.find_latest(self.out)
            if latest is not None:
                path = latest / train_state.STATE_DIR / "draft_fp32.safetensors"
                try:
                    master = load_file(str(path))
                except Exception as e:  # safetensors raises its own error types for missing/corrupt files
                    raise train_state.CheckpointError(f"cannot read the draft's master weights {path}: {e}") from e
                missing = [k for k in draft.state_dict() if k not in master and not k.startswith("rotary.")]
                if missing:
                    raise train_state.CheckpointError(f"{path} lacks {', '.join(missing)}")
                draft.load_state_dict(master, strict=False)
        draft = draft.to(self.device)
        self.t2d = draft.t2d.clone()
        module = Eagle3TrainModule(draft, args.ttt_length)
        self.autocast = False
        if self.dist.enabled and args.strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
            fully_shard(module, mp_policy=mp, reshard_after_forward=False)
        elif args.strategy != "deepspeed" and self.dtype != torch.float32:
            self.autocast = True  # single process: fp32 master weights, bf16 compute
        self.module = module

    def _build_optimizer(self):
        args = self.args
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
        warmup = int(args.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(self.total_steps, warmup))
        self.engine = None
        if args.strategy == "deepspeed":
            self.engine = _deepspeed_engine(self.module, self.optimizer, self.scheduler, args, self.dtype)

    # -- resume
    def _resume(self):
        latest = train_state.find_latest(self.out)
        if latest is None:
            self._log(f"--resume: no checkpoint in {self.out}; starting fresh")
            return
        state_dir = latest / train_state.STATE_DIR
        st = train_state.load_json(state_dir / "trainer_state.json")
        accum = self.args.draft_accumulation_steps
        grouped = st.get("args", {}).get("group_by_length", False)
        if grouped != self.args.group_by_length:
            raise train_state.CheckpointError(
                f"{latest} was trained {'with' if grouped else 'without'} --group-by-length; resuming "
                f"{'with' if self.args.group_by_length else 'without'} it would change the data order")
        capped = st.get("args", {}).get("max_answer_tokens", 0)
        if capped != self.args.max_answer_tokens:
            raise train_state.CheckpointError(
                f"{latest} was trained with --max-answer-tokens {capped}; resuming with "
                f"{self.args.max_answer_tokens} would change what each row scores and the batches' lengths")
        if st["global_batch"] != self.global_batch or st["draft_accumulation_steps"] != accum:
            raise train_state.CheckpointError(
                f"{latest} was trained with global batch {st['global_batch']} x accumulation "
                f"{st['draft_accumulation_steps']}; resuming with {self.global_batch} x "
                f"{self.args.draft_accumulation_steps} would change the data order (keep world size x batch size)")
        if self.engine is not None:
            loaded, _ = self.engine.load_checkpoint(str(state_dir / "deepspeed"), tag="state")
            if loaded is None:
                raise train_state.CheckpointError(f"no DeepSpeed state in {state_dir / 'deepspeed'}")
        else:
            self._load_optimizer(train_state.load_optimizer_state(state_dir))
        self.scheduler.load_state_dict(st["scheduler"])
        self.global_step, self.epoch, self.micro_in_epoch = st["global_step"], st["epoch"], st["micro_in_epoch"]
        train_state.load_rng(state_dir, self.dist.rank)
        self.resumed_from = latest
        self._log(f"resumed from {latest} (step {self.global_step}, epoch {self.epoch}, "
                  f"batch {self.micro_in_epoch} of the epoch)")

    def _load_optimizer(self, full: dict):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True) if self.dist.enabled else StateDictOptions()
        try:
            set_optimizer_state_dict(self.module, self.optimizer, optim_state_dict=full, options=opts)
        except (KeyError, RuntimeError, ValueError) as e:
            raise train_state.CheckpointError(f"optimizer state does not fit this draft: {e}") from e

    def _optimizer_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True) if self.dist.enabled else StateDictOptions()
        return get_optimizer_state_dict(self.module, self.optimizer, options=opts)

    # -- one micro-batch
    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = self.device
        input_ids = batch["input_ids"].to(dev)
        attention_mask = batch["attention_mask"].to(dev)
        loss_mask = batch["loss_mask"].to(dev) * attention_mask
        with torch.no_grad():
            if self.target is not None:
                out = self.target(input_ids, attention_mask)
                aux, logits = out.aux_hidden.to(dev), out.logits.to(dev)
                embeds = self.target.embed(input_ids).to(dev)
            else:
                aux = batch["aux_hidden"].to(dev, self.dtype)
                logits = F.linear(batch["last_hidden"].to(dev, self.dtype), self.lm_head)
                embeds = F.embedding(input_ids, self.embed_tokens)
            tg = prepare_targets(logits, self.t2d, loss_mask, attention_mask, self.args.ttt_length)
        return {"input_embeds": embeds, "aux_hidden": aux, "target_p": tg.target_p,
                "position_mask": tg.position_mask, "loss_mask": tg.loss_mask, "attention_mask": attention_mask}

    def _forward(self, inputs):
        runner = self.engine if self.engine is not None else self.module
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            return runner(**inputs)

    # -- loop
    def train(self) -> Path | None:
        """The training loop. SIGTERM (a scheduler's preemption or time limit; torchrun passes it on to every rank)
        makes all ranks finish the current optimizer step, save a checkpoint that --resume continues from, and exit
        with status 143."""
        received: list[int] = []
        main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum)) if main_thread else None
        try:
            last_saved = self._train_loop(received)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
        if received:
            raise SystemExit(128 + signal.SIGTERM)
        return last_saved

    def _stop_requested(self, received: list[int]) -> bool:
        """Whether any rank got SIGTERM; every rank answers the same, so they all stop after the same step."""
        if not self.dist.enabled:
            return bool(received)
        flag = torch.tensor([float(bool(received))], device=self.device)
        return bool(self.dist.all_reduce_sum(flag).item() > 0)

    def _train_loop(self, received: list[int]) -> Path | None:
        args, d = self.args, self.dist
        accum = args.draft_accumulation_steps
        max_steps = args.max_num_steps
        last_saved = None
        done = max_steps is not None and self.global_step >= max_steps
        bar = tqdm(total=max_steps or self.total_steps, initial=self.global_step, disable=not d.is_main,
                   desc="train", dynamic_ncols=True)
        t_last = time.time()
        # Throughput over training steps only (eval and checkpoint time excluded), for the logs.
        self._throughput = {"seconds": 0.0, "samples": 0, "tokens": 0}
        while not done and self.epoch < args.num_epochs:
            batches = epoch_batches(len(self.train_rows), self.global_batch, args.seed, self.epoch,
                                    lengths=self.train_rows.lengths if args.group_by_length else None)
            usable = len(batches) - len(batches) % accum
            self.module.train()
            while self.micro_in_epoch < usable:
                stats = []
                t_step = time.perf_counter()
                for _ in range(accum):
                    idx = batches[self.micro_in_epoch]
                    real = [i for i in idx if i >= 0]
                    self._throughput["samples"] += len(real)
                    self._throughput["tokens"] += sum(self.train_rows.lengths[i] for i in real)
                    pad_to = max(self.train_rows.lengths[i] for i in idx)
                    mine = idx[d.rank * args.batch_size:(d.rank + 1) * args.batch_size]
                    inputs = self._inputs(collate(self.train_rows, mine, pad_to))
                    plosses, correct, counted = self._forward(inputs)
                    if self.engine is not None:  # DeepSpeed scales by 1/accumulation and steps at the boundary
                        self.engine.backward(weighted_loss(plosses))
                        self.engine.step()
                    else:
                        (weighted_loss(plosses) / accum).backward()
                    stats.append((plosses.detach(), correct, counted))
                    self.micro_in_epoch += 1
                grad_norm = self._step()  # returns a host float: the step has finished on the device
                self._throughput["seconds"] += time.perf_counter() - t_step
                self.global_step += 1
                bar.update(1)
                plosses = torch.stack([s[0] for s in stats]).mean(0)
                correct = torch.stack([s[1] for s in stats]).sum(0)
                counted = torch.stack([s[2] for s in stats]).sum(0)
                if d.is_main:
                    acc = (correct.float() / counted.clamp_min(1)).tolist()
                    now = time.time()
                    bar.set_postfix(loss=f"{weighted_loss(plosses).item():.3f}", acc0=f"{acc[0]:.2f}",
                                    s_per_step=f"{now - t_last:.2f}")
                    t_last = now
                if self.global_step % args.log_interval == 0 or self.global_step == 1:
                    self._log_train(plosses, correct, counted, grad_norm)
                at_end = (max_steps is not None and self.global_step >= max_steps) or \
                    (self.epoch == args.num_epochs - 1 and self.micro_in_epoch >= usable)
                if self.eval_rows is not None and (self.global_step % args.eval_interval == 0 or at_end):
                    self.evaluate()
                    self.module.train()
                if self.global_step % args.save_interval == 0 or at_end:
                    last_saved = self.save()
                if self._stop_requested(received):
                    if last_saved is None or last_saved.name != train_state.checkpoint_name(
                            self.epoch, self.global_step):
                        last_saved = self.save()
                    self._log(f"SIGTERM: stopped after step {self.global_step}, saved {last_saved}; "
                              f"--resume continues from it")
                    received.append(signal.SIGTERM)  # every rank exits with the same status
                    done = True
                    break
                if max_steps is not None and self.global_step >= max_steps:
                    done = True
                    break
            if not done:
                self.epoch += 1
                self.micro_in_epoch = 0
        bar.close()
        if last_saved is None and self.global_step > 0 and not (self.out / train_state.checkpoint_name(
                self.epoch, self.global_step)).is_dir():
            last_saved = self.save()
        if self.writer is not None:
            self.writer.close()
        return last_saved

    def _step(self) -> float:
        if self.engine is not None:
            return float(self.engine.get_global_grad_norm() or 0.0)
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(norm)

    # -- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Accuracy per TTT step over the held-out split (hits / loss-mask positions, summed over all ranks) and the
        chain accept length it implies (see specforge.core.accept_length)."""
        args, d = self.args, self.dist
        self.module.eval()
        k = args.ttt_length
        loss_sum = torch.zeros(k, device=self.device, dtype=torch.float64)
        correct = torch.zeros(k, device=self.device, dtype=torch.float64)
        counted = torch.zeros(k, device=self.device, dtype=torch.float64)
        batches = epoch_batches(len(self.eval_rows), self.global_batch, args.seed, 0, shuffle=False)
        for idx in tqdm(batches, desc="eval", disable=not d.is_main, leave=False, dynamic_ncols=True):
            real = [i for i in idx if i >= 0]
            pad_to = max(self.eval_rows.lengths[i] for i in real)
            mine = idx[d.rank * args.batch_size:(d.rank + 1) * args.batch_size]
            plosses, c, n = self._forward(self._inputs(collate(self.eval_rows, mine, pad_to)))
            loss_sum += plosses.double()
            correct += c.double()
            counted += n.double()
        loss_sum, correct, counted = (d.all_reduce_sum(x) for x in (loss_sum, correct, counted))
        acc = (correct / counted.clamp_min(1)).tolist()
        ploss = (loss_sum / (len(batches) * d.world)).tolist()
        result = {"step": self.global_step, "split": "eval", "acc": acc, "ploss": ploss,
                  "loss": sum(0.8**i * p for i, p in enumerate(ploss)), "accept_length": accept_length(acc)}
        if d.is_main:
            self._record("eval", result)
            self._log(f"eval step {self.global_step}: accept_length {result['accept_length']:.3f}, "
                      f"acc {' '.join(f'{a:.3f}' for a in acc)}")
        return result

    # -- logging
    def _log_train(self, plosses, correct, counted, grad_norm):
        d = self.dist
        plosses = d.all_reduce_sum(plosses.float()) / d.world
        correct, counted = d.all_reduce_sum(correct.float()), d.all_reduce_sum(counted.float())
        if not d.is_main:
            return
        acc = (correct / counted.clamp_min(1)).tolist()
        pl = plosses.tolist()
        thr = self._throughput
        secs = max(thr["seconds"], 1e-9)
        record = {"step": self.global_step, "split": "train", "epoch": self.epoch,
                  "loss": weighted_loss(plosses).item(), "ploss": pl, "acc": acc,
                  "accept_length": accept_length(acc), "lr": self.scheduler.get_last_lr()[0],
                  "grad_norm": grad_norm, "samples_per_s": thr["samples"] / secs, "tokens_per_s": thr["tokens"] / secs,
                  "train_seconds": thr["seconds"]}
        if self.device.type == "cuda":
            record["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._record("train", record)

    def _record(self, split: str, result: dict):
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        if self.writer is None:
            return
        step = result["step"]
        for key, value in result.items():
            if isinstance(value, list):
                for i, v in enumerate(value):
                    self.writer.add_scalar(f"{split}/{key}_{i}", v, step)
            elif isinstance(value, float):
                self.writer.add_scalar(f"{split}/{key}", value, step)
        self.writer.flush()

    def _log(self, msg: str):
        if self.dist.is_main:
            tqdm.write(f"[specforge] {msg}")

    # -- checkpoints
    def save(self) -> Path:
        """epoch_E_step_S/: the draft (SGLang layout) + training_state/; then `latest` points at it."""
        d = self.dist
        name = train_state.checkpoint_name(self.epoch, self.global_step)
        folder = self.out / name
        state_dir = folder / train_state.STATE_DIR
        if d.is_main:
            state_dir.mkdir(parents=True, exist_ok=True)
        d.barrier()
        full = draft_state(self.module if self.engine is None else self.engine)
        optim = None if self.engine is not None else self._optimizer_state()
        if self.engine is not None:
            self.engine.save_checkpoint(str(state_dir / "deepspeed"), tag="state")
        if d.is_main:
            draft = Eagle3DraftModel(self.draft_config)
            draft.load_state_dict(full, strict=True)
            save_dtype = torch.bfloat16 if self.args.save_dtype == "bfloat16" else torch.float32
            save_draft(draft, folder, dtype=save_dtype)
            save_file({k: v.float() if v.is_floating_point() else v for k, v in full.items()},
                      str(state_dir / "draft_fp32.safetensors"))
            if optim is not None:
                train_state.save_optimizer_state(optim, state_dir)
            train_state.save_json(state_dir / "trainer_state.json", {
                "global_step": self.global_step, "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch,
                "global_batch": self.global_batch, "draft_accumulation_steps": self.args.draft_accumulation_steps,
                "world_size": d.world, "total_steps": self.total_steps, "scheduler": self.scheduler.state_dict(),
                "args": asdict(self.args), "target_model_path": str(self.target_path),
            })
        state_dir.mkdir(parents=True, exist_ok=True)
        train_state.save_rng(state_dir, d.rank)
        d.barrier()
        if d.is_main:
            tmp = self.out / (train_state.LATEST + ".tmp")
            tmp.write_text(name + "\n")
            tmp.replace(self.out / train_state.LATEST)
            self._log(f"saved {folder}")
        d.barrier()
        return folder

    def close(self):
        self.dist.close()


def _default_target() -> str:
    from specbundle.assets import smollm2_gguf_path

    return str(smollm2_gguf_path())


def _deepspeed_engine(module, optimizer, scheduler, args: TrainArgs, dtype: torch.dtype):
    try:
        import deepspeed
    except ImportError as e:
        raise RuntimeError("--strategy deepspeed needs the deepspeed package (pip install deepspeed); "
                           "or use --strategy fsdp") from e
    config = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": args.draft_accumulation_steps,
        "gradient_clipping": args.max_grad_norm,
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,  # plain torch AdamW, as SpecForge uses
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def run_training(args: TrainArgs) -> Path | None:
    trainer = Trainer(args)
    try:
        return trainer.train()
    finally:
        trainer.close()
