"""Known EAGLE-3 bundles: the public SpecBundle / SGLang checkpoints and the project's own packaged SmolLM2 bundle.

Public entries are from SpecForge's `docs/community_resources/specbundle.md` (SpecBundle release table) and SGLang's
docs and tests (the earlier `lmsys/sglang-EAGLE3-LLaMA3.*` checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from specbundle.assets import DEFAULT_TARGET_ID

PACKAGED_DIR = Path(__file__).parent / "bundles"


@dataclass(frozen=True)
class CatalogEntry:
    target_id: str
    repo_id: str | None  # Hub repo of the bundle; None for a bundle that only ships inside this package
    packaged: str | None = None  # folder name under specbundle/bundles/
    note: str = ""

    @property
    def packaged_path(self) -> Path | None:
        return PACKAGED_DIR / self.packaged if self.packaged else None

    @property
    def location(self) -> str:
        return f"package:{self.packaged}" if self.packaged else str(self.repo_id)


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(DEFAULT_TARGET_ID, None, packaged="smollm2-135m-instruct-eagle3", note="this project's bundle"),
    CatalogEntry(
        "meta-llama/Llama-3.1-8B-Instruct", "lmsys/SGLang-EAGLE3-Llama-3.1-8B-Instruct-SpecForge", note="SpecBundle"
    ),
    CatalogEntry(
        "meta-llama/Llama-3.3-70B-Instruct", "lmsys/SGLang-EAGLE3-Llama-3.3-70B-Instruct-SpecForge", note="SpecBundle"
    ),
    CatalogEntry(
        "meta-llama/Llama-4-Scout-17B-16E-Instruct",
        "lmsys/SGLang-EAGLE3-Llama-4-Scout-17B-16E-Instruct-SpecForge",
        note="SpecBundle",
    ),
    CatalogEntry(
        "meta-llama/Llama-4-Maverick-17B-128E-Instruct",
        "lmsys/sglang-EAGLE3-Llama-4-Maverick-17B-128E-Instruct-v1",
        note="SpecForge (ShareGPT+UltraChat)",
    ),
    CatalogEntry(
        "Qwen/Qwen3-30B-A3B-Instruct-2507",
        "lmsys/SGLang-EAGLE3-Qwen3-30B-A3B-Instruct-2507-SpecForge-Nex",
        note="SpecBundle",
    ),
    CatalogEntry(
        "Qwen/Qwen3-235B-A22B-Instruct-2507",
        "lmsys/SGLang-EAGLE3-Qwen3-235B-A22B-Instruct-2507-SpecForge-Meituan",
        note="SpecBundle",
    ),
    CatalogEntry(
        "Qwen/Qwen3-Next-80B-A3B-Instruct-FP8",
        "lmsys/SGLang-EAGLE3-Qwen3-Next-80B-A3B-Instruct-FP8-perfect-blend-regenerated",
        note="SpecBundle",
    ),
    CatalogEntry(
        "Qwen/Qwen3-Coder-30B-A3B-Instruct",
        "lmsys/SGLang-EAGLE3-Qwen3-Coder-30B-A3B-Instruct-SpecForge",
        note="SpecBundle",
    ),
    CatalogEntry(
        "Qwen/Qwen3-Coder-480B-A35B-Instruct",
        "lmsys/SGLang-EAGLE3-Qwen3-Coder-480B-A35B-Instruct-SpecForge-EigenAI",
        note="SpecBundle",
    ),
    CatalogEntry("inclusionAI/Ling-flash-2.0", "AQ-MedAI/Ling-Flash-2.0-eagle3", note="SpecBundle"),
    CatalogEntry("moonshotai/Kimi-K2-Instruct", "AQ-MedAI/Kimi-K2-Instruct-eagle3", note="SpecBundle"),
    CatalogEntry("openai/gpt-oss-20b", "zhuyksir/EAGLE3-gpt-oss-20b-bf16", note="SpecForge (Perfect-Blend)"),
    CatalogEntry("openai/gpt-oss-120b", "lmsys/EAGLE3-gpt-oss-120b-bf16", note="SpecForge (Perfect-Blend)"),
    CatalogEntry("nex-agi/Qwen3-30B-A3B-Nex-N1", "nex-agi/SGLANG-EAGLE3-Qwen3-30B-A3B-Nex-N1", note="SpecBundle"),
    CatalogEntry("nex-agi/Qwen3-32B-Nex-N1", "nex-agi/SGLANG-EAGLE3-Qwen3-32B-Nex-N1", note="SpecBundle"),
    # Earlier SGLang checkpoints (SGLang docs and CI); kept so their repo ids resolve to a target.
    CatalogEntry(
        "meta-llama/Llama-3.1-8B-Instruct", "lmsys/sglang-EAGLE3-LLaMA3.1-Instruct-8B", note="SGLang (legacy)"
    ),
    CatalogEntry(
        "meta-llama/Llama-3.3-70B-Instruct", "lmsys/sglang-EAGLE3-LLaMA3.3-Instruct-70B", note="SGLang (legacy)"
    ),
)


def _norm(repo_id: str) -> str:
    return repo_id.strip().lower()


def find_by_target(target_id: str) -> CatalogEntry | None:
    """The preferred bundle for a target (the first catalog entry; Hub ids compare case-insensitively)."""
    return next((e for e in CATALOG if _norm(e.target_id) == _norm(target_id)), None)


def find_by_repo(repo_id: str) -> CatalogEntry | None:
    return next((e for e in CATALOG if e.repo_id and _norm(e.repo_id) == _norm(repo_id)), None)


def format_catalog() -> str:
    rows = [("target", "bundle", "source")] + [(e.target_id, e.location, e.note) for e in CATALOG]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
