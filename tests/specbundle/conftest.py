import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specbundle.bundle import BundleMetadata, SpeculativeConfig, seal_bundle
from specbundle.checkpoint import save_draft
from specbundle.config import DraftConfig
from specbundle.modeling import Eagle3DraftModel

from .fake_hub import FakeHub

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_TARGET_ID = "tiny-org/TinyLlama-8L"
# Tiny Llama-shaped target: hidden 64, 4 heads (2 KV), 8 layers -> default aux layers [1, 3, 4].
TINY_TARGET = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=256,
    num_hidden_layers=8,
)


LOOPBACK = ("127.0.0.1", "::1", "localhost")
# Where huggingface_hub's default endpoint points during tests: a closed loopback port (fails fast, reaches nothing).
NO_HUB = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Nothing may reach the network: any name lookup or connection outside loopback is recorded and fails the test
    (recorded, because huggingface_hub swallows errors in best-effort requests such as its agent-registry fetch)."""

    attempts = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            attempts.append(address)
            raise OSError(f"test tried to reach the network: {address}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOOPBACK and host is not None:
            attempts.append(host)
            raise OSError(f"test tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    set_default_endpoint(monkeypatch, NO_HUB)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield
    assert not attempts, f"the test tried to reach the network: {attempts}"


def set_default_endpoint(monkeypatch, url: str) -> None:
    """As if HF_ENDPOINT=url had been set before huggingface_hub was imported (both constants derive from it)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    monkeypatch.setattr(
        huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )


@pytest.fixture
def hub():
    with FakeHub() as h:
        yield h


def make_tiny_bundle(folder: Path, seed: int = 0, target_id: str = TINY_TARGET_ID, **meta_kwargs) -> Path:
    cfg = DraftConfig.for_target(TINY_TARGET, draft_vocab_size=64, aux_layer_ids=[1, 3, 4])
    torch.manual_seed(seed)
    model = Eagle3DraftModel(cfg)
    model.t2d[:64] = True
    save_draft(model, folder)
    meta = BundleMetadata(
        target_id=target_id,
        aux_layer_ids=[1, 3, 4],
        draft_vocab_size=64,
        speculative=SpeculativeConfig(num_steps=3, eagle_topk=1, num_draft_tokens=4),
        accept_length={"mt-bench": 2.5, "gsm8k": 3.1},
        training_data=["anon8231489123/ShareGPT_Vicuna_unfiltered"],
        recipe="recipes/tiny",
        **meta_kwargs,
    )
    seal_bundle(folder, meta)
    return folder


@pytest.fixture
def tiny_bundle(tmp_path) -> Path:
    return make_tiny_bundle(tmp_path / "tiny-bundle")


@pytest.fixture
def tiny_target(tmp_path) -> Path:
    """A local HF model folder (config only) whose config names its Hub id."""
    from transformers import LlamaConfig

    folder = tmp_path / "tiny-target"
    LlamaConfig(**TINY_TARGET).save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    data["_name_or_path"] = TINY_TARGET_ID
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def run_cli(*args: str, hub_url: str | None = None, offline: bool = False, code: str | None = None):
    """Run `specbundle` (or a Python snippet) in a fresh interpreter: HF_ENDPOINT and HF_HUB_OFFLINE are read by
    huggingface_hub at import time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(REPO_ROOT))
    # Nothing may leave the machine: with no fake Hub the endpoint is a closed loopback port.
    env["HF_ENDPOINT"] = hub_url or NO_HUB
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "specbundle.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
