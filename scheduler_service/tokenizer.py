"""Loads the tokenizer for a model source (the scheduler's side of model resolution)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sarathi_common.model_spec import ModelKind, ModelSource, cache_root, converted_dir


def load_tokenizer(source: ModelSource, override: str | None = None):
    """A transformers tokenizer, or None for dummy models (they take token ids only)."""
    from transformers import AutoTokenizer

    if override:
        return AutoTokenizer.from_pretrained(override)
    if source.kind is ModelKind.DUMMY:
        return None
    if source.kind is ModelKind.HF_FOLDER:
        return AutoTokenizer.from_pretrained(source.location)
    converted = converted_dir(source.location)
    if (converted / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(converted))
    # Reading a tokenizer out of a GGUF file takes seconds: do it once, keep the result.
    cached = cache_root() / "tokenizers" / converted.name
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(cached))
    path = Path(source.location)
    if importlib.util.find_spec("torch") is None:
        # transformers reads GGUF files with torch; a scheduler installed without it (no `worker`
        # extra) takes the tokenizer from a folder instead.
        raise SystemExit(f"reading the tokenizer out of {path.name} needs torch, which this scheduler "
                         "was installed without: pass --tokenizer FOLDER (a tokenizer saved by "
                         f"save_pretrained), or let a worker's install fill {cached} first")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    cached.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(cached))
    return tok
