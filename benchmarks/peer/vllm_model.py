"""The model vLLM loads: a Hugging Face config folder of the same shape as our `dummy:NAME`
model (worker_service's DUMMY_CONFIGS), for `load_format="dummy"`. No tokenizer is written: the
engine runs with skip_tokenizer_init and is given token ids, as our server is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# What a HF config.json has beyond our shape table; bf16 as both systems run it.
_HF_EXTRAS: dict[str, Any] = {
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "bfloat16",
}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def dummy_hf_config(name: str) -> dict[str, Any]:
    """config.json contents for a `dummy:NAME` shape (llama3-8b: hidden 4096, 32 layers, 32 heads,
    8 KV heads, intermediate 14336, vocab 128256, rope_theta 500000, 8192 positions)."""
    from worker_service.models.loader import DUMMY_CONFIGS  # lazy: it loads torch

    if name not in DUMMY_CONFIGS:
        raise ValueError(f"unknown dummy model {name!r}: use one of {', '.join(DUMMY_CONFIGS)}")
    shape = dict(DUMMY_CONFIGS[name])
    return {"architectures": [_ARCHITECTURES[shape["model_type"]]], **_HF_EXTRAS, **shape}


def write_model_folder(name: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dummy_hf_config(name), indent=1) + "\n")
    return folder


def model_name(model: str) -> str:
    """`dummy:llama3-8b` -> `llama3-8b`: only dummy shapes are supported, so both systems run
    identical weights-free models."""
    if not model.startswith("dummy:"):
        raise SystemExit(f"--model {model!r}: the peer benchmark runs dummy:NAME shapes only")
    return model.removeprefix("dummy:")
