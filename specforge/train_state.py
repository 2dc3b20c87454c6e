"""Checkpoints: `<out>/epoch_E_step_S/` = an SGLang-loadable draft (config.json + model.safetensors) plus
`training_state/` (fp32 master weights, AdamW state, scheduler, data position, RNG) and `<out>/latest`.

Everything is safetensors + JSON; nothing is unpickled on resume.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_DIR = "training_state"
LATEST = "latest"
_CKPT_RE = re.compile(r"^epoch_(\d+)_step_(\d+)$")


class CheckpointError(ValueError):
    """A training checkpoint that cannot be resumed from; the message names the file."""


def checkpoint_name(epoch: int, step: int) -> str:
    return f"epoch_{epoch}_step_{step}"


def find_latest(output_dir: str | Path) -> Path | None:
    """The checkpoint named by `<out>/latest`, else the complete one with the highest step, else None."""
    output_dir = Path(output_dir)
    pointer = output_dir / LATEST
    if pointer.is_file():
        path = output_dir / pointer.read_text().strip()
        if not (path / STATE_DIR / "trainer_state.json").is_file():
            raise CheckpointError(f"{pointer} names {path}, which has no {STATE_DIR}/trainer_state.json")
        return path
    found = []
    for d in output_dir.glob("epoch_*_step_*"):
        m = _CKPT_RE.match(d.name)
        if m and (d / STATE_DIR / "trainer_state.json").is_file():
            found.append((int(m.group(2)), d))
    return max(found)[1] if found else None


def save_optimizer_state(state: dict, folder: Path) -> None:
    """A FQN-keyed optimizer state dict ({"state": {fqn: {...}}, "param_groups": [...]}) -> safetensors + JSON."""
    tensors, scalars = {}, {}
    for fqn, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{fqn}::{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(fqn, {})[name] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars},
                                                      indent=1) + "\n")


def load_optimizer_state(folder: Path) -> dict:
    try:
        tensors = load_file(str(folder / "optimizer.safetensors"))
        meta = json.loads((folder / "optimizer.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read optimizer state in {folder}: {e}") from e
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        fqn, name = key.rsplit("::", 1)
        state.setdefault(fqn, {})[name] = value
    for fqn, entries in meta.get("scalars", {}).items():
        state.setdefault(fqn, {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_rng(folder: Path, rank: int) -> None:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(folder / f"rng_rank{rank}.safetensors"))
    state = random.getstate()
    (folder / f"python_rng_rank{rank}.json").write_text(json.dumps([state[0], list(state[1]), state[2]]))


def load_rng(folder: Path, rank: int) -> None:
    path = folder / f"rng_rank{rank}.safetensors"
    if not path.is_file():  # resumed on more ranks than saved: fresh streams are fine, nothing random is drawn
        return
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    py = folder / f"python_rng_rank{rank}.json"
    if py.is_file():
        version, internal, gauss = json.loads(py.read_text())
        random.setstate((version, tuple(internal), gauss))


def save_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
