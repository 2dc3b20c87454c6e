"""The bundle's model card (README.md): Hub YAML front matter + usage + a results table, all from bundle.json."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCardData

from specbundle.bundle import CARD_NAME, BundleMetadata

TAGS = ["eagle3", "speculative-decoding", "draft-model", "sglang", "specforge", "specbundle"]


def card_data(meta: BundleMetadata) -> ModelCardData:
    return ModelCardData(
        base_model=meta.target_id,
        library_name="sglang",
        license=meta.license,
        tags=list(TAGS),
        datasets=list(meta.training_data) or None,
        pipeline_tag="text-generation",
    )


def render_card(meta: BundleMetadata, repo_id: str | None = None) -> str:
    name = meta.name or (repo_id.split("/")[-1] if repo_id else f"EAGLE-3 draft for {meta.target_id}")
    draft_path = repo_id or "<this-repo>"
    spec = meta.speculative
    lines = [
        "---",
        card_data(meta).to_yaml(),
        "---",
        "",
        f"# {name}",
        "",
        f"An EAGLE-3 draft head for [{meta.target_id}](https://huggingface.co/{meta.target_id})"
        + (f" (revision `{meta.target_revision}`)" if meta.target_revision else "")
        + ", in the SGLang / SpecForge checkpoint layout (`config.json` + `model.safetensors`).",
        "",
    ]
    if meta.description:
        lines += [meta.description, ""]
    if not meta.trained:
        lines += [
            "> **Untrained placeholder.** These weights are randomly initialised: the checkpoint has the right shapes "
            'for the target, but drafts will almost never be accepted. `bundle.json` records `"trained": false`.',
            "",
        ]
    lines += [
        "## Usage",
        "",
        "```bash",
        "python3 -m sglang.launch_server \\",
        f"    --model {meta.target_id} \\",
        f"    --speculative-algorithm {spec.algorithm} \\",
        f"    --speculative-draft-model-path {draft_path} \\",
        f"    --speculative-num-steps {spec.num_steps} \\",
        f"    --speculative-eagle-topk {spec.eagle_topk} \\",
        f"    --speculative-num-draft-tokens {spec.num_draft_tokens}",
        "```",
        "",
        "## Draft",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| target | `{meta.target_id}` |",
        f"| target revision | `{meta.target_revision or 'any'}` |",
        f"| aux hidden-state layers | {', '.join(str(i) for i in meta.aux_layer_ids)} |",
        f"| draft vocabulary | {meta.draft_vocab_size} |",
        f"| trained | {'yes' if meta.trained else 'no (placeholder)'} |",
        f"| training data | {', '.join(meta.training_data) or 'none'} |",
        f"| recipe | {meta.recipe or 'none'} |",
        "",
        "## Results",
        "",
    ]
    if meta.accept_length:
        lines += [
            "Accept length: mean tokens accepted per verify step, bonus token included. The recommended config "
            f"is num_steps={spec.num_steps}, eagle_topk={spec.eagle_topk}, num_draft_tokens={spec.num_draft_tokens}; "
            "a benchmark measured with another config names it.",
            "",
            "| benchmark | accept length |",
            "| --- | --- |",
        ]
        lines += [f"| {bench} | {value:.2f} |" for bench, value in sorted(meta.accept_length.items())]
    else:
        lines += ["No measured results yet."]
    lines += [
        "",
        "Every file's sha256 is recorded in `bundle.json`; `specbundle verify` checks them.",
        "",
    ]
    return "\n".join(lines)


def write_card(folder: str | Path, meta: BundleMetadata, repo_id: str | None = None) -> Path:
    path = Path(folder) / CARD_NAME
    path.write_text(render_card(meta, repo_id))
    return path
