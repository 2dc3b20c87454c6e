"""Write the packaged SmolLM2-135M-Instruct bundle with a deterministic, randomly initialised (untrained) draft.

    python scripts/make_placeholder_bundle.py [--out specbundle/bundles/smollm2-135m-instruct-eagle3]

A trained draft replaces it later: save it with specbundle.checkpoint.save_draft into the same folder, then
`specbundle card <folder> --write --trained` re-records the card and the hashes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from specbundle.assets import DEFAULT_TARGET_ID
from specbundle.bundle import BundleMetadata, SpeculativeConfig, seal_bundle
from specbundle.checkpoint import save_draft
from specbundle.config import DraftConfig, default_aux_layer_ids
from specbundle.modeling import Eagle3DraftModel

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "specbundle" / "bundles" / "smollm2-135m-instruct-eagle3"

# SmolLM2-135M-Instruct (config.json of the Hub repo).
TARGET = dict(
    hidden_size=576,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=49152,
    num_hidden_layers=30,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
)
DRAFT_VOCAB_SIZE = 8192  # assistant tokens of SmolLM2 chat data are well covered; keeps the draft ~15 MB


def make_placeholder(out: Path, seed: int = 0) -> Path:
    aux = default_aux_layer_ids(TARGET["num_hidden_layers"])  # [1, 14, 26]
    cfg = DraftConfig.for_target(TARGET, draft_vocab_size=DRAFT_VOCAB_SIZE, aux_layer_ids=aux)
    torch.manual_seed(seed)
    model = Eagle3DraftModel(cfg)
    # Identity map onto the first draft_vocab_size target ids: d2t offsets are 0, t2d marks those ids.
    model.d2t.zero_()
    model.t2d.zero_()
    model.t2d[:DRAFT_VOCAB_SIZE] = True
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if stale.is_file():
            stale.unlink()
    save_draft(model, out, dtype=torch.bfloat16)
    meta = BundleMetadata(
        name="SmolLM2-135M-Instruct EAGLE-3 draft (placeholder)",
        target_id=DEFAULT_TARGET_ID,
        aux_layer_ids=aux,
        draft_vocab_size=DRAFT_VOCAB_SIZE,
        speculative=SpeculativeConfig(num_steps=3, eagle_topk=1, num_draft_tokens=4),
        trained=False,
        recipe=f"random initialisation, torch.manual_seed({seed}) (scripts/make_placeholder_bundle.py)",
        license="apache-2.0",
    )
    seal_bundle(out, meta)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="bundle folder to (re)write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = make_placeholder(args.out, args.seed)
    for path in sorted(out.iterdir()):
        print(f"{path.stat().st_size:>12,}  {path}")


if __name__ == "__main__":
    main()
