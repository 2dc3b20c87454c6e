"""Offline mode's on-disk format: the target's outputs computed once, so training runs without the target.

A hidden-states folder holds
    meta.json                  format/version, the target's config, aux layer ids, shard list
    target_head.safetensors    `lm_head.weight` [V, H] and `embed_tokens.weight` [V, H], stored once
    shard_r{rank}_{k}.safetensors, each with its samples' tokens concatenated:
        input_ids [N] int32, loss_mask [N] uint8, aux_hidden [N, 3H], last_hidden [N, H] (bf16 by default),
        offsets [n + 1] int64 (sample s is rows offsets[s]:offsets[s+1]), sample_ids [n] int64
`last_hidden` is the target's final-norm output, so logits = last_hidden @ lm_head.T are recomputed exactly.
Samples are read back in `sample_ids` order, whatever the number of ranks that wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "specforge-hidden-states"
VERSION = 1
META = "meta.json"
HEAD = "target_head.safetensors"


class HiddenStatesError(ValueError):
    """A hidden-states folder that is missing, incomplete or inconsistent; the message names the file."""


class ShardWriter:
    """Buffers samples and writes a shard every `shard_size` samples (rank-local file names)."""

    def __init__(self, folder: str | Path, rank: int = 0, shard_size: int = 1000, dtype: torch.dtype = torch.bfloat16):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank, self.shard_size, self.dtype = rank, shard_size, dtype
        self.buffer: list[dict] = []
        self.num_shards = 0

    def add(self, sample_id: int, input_ids, loss_mask, aux_hidden: torch.Tensor, last_hidden: torch.Tensor):
        """One sample: input_ids/loss_mask [L], aux_hidden [L, 3H], last_hidden [L, H] (padding already cut)."""
        self.buffer.append({
            "sample_id": sample_id,
            "input_ids": torch.as_tensor(input_ids, dtype=torch.int32).cpu(),
            "loss_mask": torch.as_tensor(loss_mask, dtype=torch.uint8).cpu(),
            "aux_hidden": aux_hidden.detach().to("cpu", self.dtype),
            "last_hidden": last_hidden.detach().to("cpu", self.dtype),
        })
        if len(self.buffer) >= self.shard_size:
            self.flush()

    def flush(self):
        if not self.buffer:
            return
        lengths = torch.tensor([s["input_ids"].numel() for s in self.buffer], dtype=torch.int64)
        tensors = {
            key: torch.cat([s[key] for s in self.buffer]).contiguous()
            for key in ("input_ids", "loss_mask", "aux_hidden", "last_hidden")
        }
        tensors["offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        tensors["sample_ids"] = torch.tensor([s["sample_id"] for s in self.buffer], dtype=torch.int64)
        name = f"shard_r{self.rank}_{self.num_shards:05d}.safetensors"
        save_file(tensors, str(self.folder / f".{name}.tmp"), metadata={"format": FORMAT})
        (self.folder / f".{name}.tmp").rename(self.folder / name)
        self.num_shards += 1
        self.buffer = []


def write_head(folder: str | Path, lm_head: torch.Tensor, embed_tokens: torch.Tensor, dtype=torch.bfloat16):
    save_file(
        {"lm_head.weight": lm_head.detach().to("cpu", dtype).contiguous(),
         "embed_tokens.weight": embed_tokens.detach().to("cpu", dtype).contiguous()},
        str(Path(folder) / HEAD),
    )


def write_meta(folder: str | Path, **fields) -> dict:
    """Called once all shards exist: records them (sorted) with the target's description in `fields`."""
    folder = Path(folder)
    shards = []
    for f in sorted(folder.glob("shard_r*_*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            shards.append({"file": f.name, "num_samples": fh.get_slice("sample_ids").get_shape()[0]})
    meta = {"format": FORMAT, "version": VERSION, **fields, "shards": shards,
            "num_samples": sum(s["num_samples"] for s in shards)}
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


class HiddenStatesDataset:
    """Random access to a hidden-states folder: `ds[i]` -> dict of tensors for the i-th sample (by sample id)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / META
        if not meta_path.is_file():
            raise HiddenStatesError(f"{meta_path} not found: run `specforge prepare-hidden-states` first")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise HiddenStatesError(f"{meta_path} is not valid JSON: {e}") from e
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise HiddenStatesError(f"{meta_path}: not a {FORMAT} v{VERSION} folder")
        self._handles: dict[str, object] = {}
        index = []  # (sample_id, shard file, local index)
        self._offsets: dict[str, torch.Tensor] = {}
        for shard in self.meta["shards"]:
            path = self.folder / shard["file"]
            if not path.is_file():
                raise HiddenStatesError(f"hidden-states shard {path} listed in meta.json is missing")
            fh = self._open(shard["file"])
            offsets = fh.get_tensor("offsets")
            ids = fh.get_tensor("sample_ids")
            self._offsets[shard["file"]] = offsets
            index += [(int(s), shard["file"], j) for j, s in enumerate(ids.tolist())]
        index.sort()
        if len({s for s, _, _ in index}) != len(index):
            raise HiddenStatesError(f"{self.folder}: duplicate sample ids across shards")
        self._index = [(f, j) for _, f, j in index]
        self.lengths = [int(self._offsets[f][j + 1] - self._offsets[f][j]) for f, j in self._index]

    def _open(self, name: str):
        if name not in self._handles:
            try:
                self._handles[name] = safe_open(str(self.folder / name), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise HiddenStatesError(f"cannot read hidden-states shard {self.folder / name}: {e}") from e
        return self._handles[name]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        name, j = self._index[i]
        fh = self._open(name)
        a, b = int(self._offsets[name][j]), int(self._offsets[name][j + 1])
        return {
            "input_ids": fh.get_slice("input_ids")[a:b].long(),
            "loss_mask": fh.get_slice("loss_mask")[a:b].long(),
            "aux_hidden": fh.get_slice("aux_hidden")[a:b],
            "last_hidden": fh.get_slice("last_hidden")[a:b],
        }

    def tokens(self, i: int) -> dict[str, list[int]]:
        name, j = self._index[i]
        fh = self._open(name)
        a, b = int(self._offsets[name][j]), int(self._offsets[name][j + 1])
        return {"input_ids": fh.get_slice("input_ids")[a:b].tolist(),
                "loss_mask": fh.get_slice("loss_mask")[a:b].tolist()}

    def head(self) -> dict[str, torch.Tensor]:
        path = self.folder / HEAD
        if not path.is_file():
            raise HiddenStatesError(f"{path} not found (the target's lm_head/embedding are stored there)")
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in ("lm_head.weight", "embed_tokens.weight")}


def prepare_hidden_states(
    target_model_path: str,
    data_path: str,
    output_dir: str,
    max_length: int = 2048,
    batch_size: int = 1,
    chat_template: str | None = None,
    num_proc: int = 8,
    cache_dir: str | None = None,
    aux_layer_ids: list[int] | None = None,
    dtype: str = "auto",
    device: str | None = None,
    device_map: str | None = None,
    shard_size: int = 1000,
    storage_dtype: str = "bfloat16",
) -> dict | None:
    """Run the target once over the data and write a hidden-states folder. Under torchrun each rank takes samples
    i % world == rank; rank 0 writes meta.json and target_head.safetensors. Returns the meta (rank 0)."""
    from tqdm import tqdm

    from specforge.args import TrainArgs
    from specforge.target import TargetModel, resolve_dtype
    from specforge.trainer import Dist, TokenRows, collate, load_token_dataset

    d = Dist(device)
    out = Path(output_dir)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for old in list(out.glob("shard_r*_*.safetensors")) + [out / META]:
            old.unlink(missing_ok=True)
    d.barrier()
    target = TargetModel.from_pretrained(target_model_path, dtype=dtype, device=d.device, aux_layer_ids=aux_layer_ids,
                                         device_map=device_map)
    args = TrainArgs(train_data_path=data_path, output_dir=output_dir, max_length=max_length,
                     chat_template=chat_template, build_dataset_num_proc=num_proc, cache_dir=cache_dir)
    if not d.is_main:
        d.barrier()
    rows = TokenRows(load_token_dataset(data_path, target_model_path, args), max_length)
    if d.is_main:
        d.barrier()
    store = resolve_dtype(storage_dtype, d.device) if storage_dtype != "auto" else target.dtype
    writer = ShardWriter(out, rank=d.rank, shard_size=shard_size, dtype=store)
    mine = list(range(d.rank, len(rows), d.world))
    for k in tqdm(range(0, len(mine), batch_size), desc="hidden states", disable=not d.is_main, dynamic_ncols=True):
        idx = mine[k:k + batch_size]
        batch = collate(rows, idx, max(rows.lengths[i] for i in idx))
        res = target(batch["input_ids"], batch["attention_mask"], with_logits=False)
        for j, i in enumerate(idx):
            n = rows.lengths[i]
            writer.add(i, batch["input_ids"][j, :n], batch["loss_mask"][j, :n], res.aux_hidden[j, :n],
                       res.last_hidden[j, :n])
    writer.flush()
    d.barrier()
    meta = None
    if d.is_main:
        write_head(out, target.lm_head_weight(), target.embed_weight(), dtype=store)
        meta = write_meta(out, target_model_path=str(target_model_path), target_config=target.config_dict(),
                          aux_layer_ids=target.aux_layer_ids, hidden_size=target.hidden_size,
                          vocab_size=target.vocab_size, max_length=max_length, dtype=str(store).removeprefix("torch."))
    d.barrier()
    d.close()
    return meta
