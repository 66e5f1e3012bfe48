"""Builds a LlamaModel from a GGUF file, a Hugging Face folder, or random weights of a known shape.

GGUF files are converted once (dequantised by transformers) into a Hugging Face folder in the
cache, so every later start loads safetensors directly.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm import tqdm

from sarathi_common.model_spec import ModelKind, ModelSource, converted_dir
from worker_service.attention import AttentionBackend
from worker_service.models.config import ModelConfig
from worker_service.models.llama import LlamaModel

# Shapes of real models for dummy-weight benchmarks (values from their published configs).
DUMMY_CONFIGS: dict[str, dict] = {
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=False, eos_token_id=128001),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=32768,
                       rope_theta=1000000.0, tie_word_embeddings=False, eos_token_id=2),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=32768,
                       rope_theta=1000000.0, tie_word_embeddings=False, eos_token_id=151645),
    "llama3-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192,
                       intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False, eos_token_id=128001),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rms_norm_eps=1e-5, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, eos_token_id=2),
    # Small enough for fast CPU tests, with GQA and more than one block per prompt.
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 rms_norm_eps=1e-5, max_position_embeddings=2048, rope_theta=10000.0,
                 tie_word_embeddings=False, eos_token_id=0),
}


def hf_config_for(source: ModelSource):
    """The transformers config object for any source (converting a GGUF file first)."""
    from transformers import AutoConfig

    if source.kind is ModelKind.DUMMY:
        spec = source.location
        if spec in DUMMY_CONFIGS:
            values = dict(DUMMY_CONFIGS[spec])
        elif Path(spec).is_file():
            values = json.loads(Path(spec).read_text())
        else:
            names = ", ".join(DUMMY_CONFIGS)
            raise ValueError(f"unknown dummy model {spec!r}: use one of {names} or a config.json")
        model_type = values.pop("model_type", "llama")
        return AutoConfig.for_model(model_type, **values)
    return AutoConfig.from_pretrained(str(hf_folder_for(source)))


def hf_folder_for(source: ModelSource) -> Path:
    if source.kind is ModelKind.HF_FOLDER:
        return Path(source.location)
    if source.kind is ModelKind.GGUF:
        return convert_gguf(source.location)
    raise ValueError("dummy models have no folder")


def convert_gguf(gguf_path: str) -> Path:
    """Dequantises a GGUF file once into a cached Hugging Face folder (weights + tokenizer).
    Processes converting the same file at once (the ranks of a replica) take turns on a lock
    file: the first converts, the others find its result."""
    target = converted_dir(gguf_path)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if (target / "config.json").exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = str(Path(gguf_path).parent), Path(gguf_path).name
        print(f"converting {name} once into {target} (later starts load the cache)", flush=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # Write beside the target, then rename: a concurrent start never sees half a folder.
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        # save_pretrained refuses GGUF-loaded models, so write the dequantised tensors ourselves.
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        return target


class ModelPart(Protocol):
    """What one process keeps of the whole model (a pipeline stage, a tensor-parallel shard)."""

    def shape(self, model: LlamaModel) -> nn.Module:
        """The whole model's skeleton (meta tensors, no weights) -> this part's skeleton, whose
        parameter names are those of the whole model's that it keeps (layers renumbered)."""

    def keep(self, name: str, whole: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """One whole weight of our layout -> the (parameter name, tensor) pairs this part makes of
        it; none when it keeps nothing of it. A tensor must not share storage with `whole`
        unless it is all of it, so that the whole one is freed."""


class WholeModel:
    def shape(self, model: LlamaModel) -> nn.Module:
        return model

    def keep(self, name: str, whole: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return [(name, whole)]


def _checkpoint_stream(folder: Path, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors in our layout (q/k/v and gate/up fused), read one weight at a
    time from the safetensors files, so a process never holds more than one whole tensor."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {name: h for h in handles for name in h.keys()}  # noqa: SIM118 - safe_open has no iterator

    def take(name: str) -> torch.Tensor:
        if name not in where:
            raise ValueError(f"weights missing from the checkpoint: {name} (in {folder})")
        return where[name].get_tensor(name)

    yield "embed_tokens.weight", take("model.embed_tokens.weight")
    for i in range(config.num_layers):
        p, attn = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        ours = f"layers.{i}."
        yield ours + "input_norm.weight", take(p + "input_layernorm.weight")
        yield ours + "attn.qkv_proj.weight", torch.cat(
            [take(attn + "q_proj.weight"), take(attn + "k_proj.weight"), take(attn + "v_proj.weight")])
        if config.attention_bias:
            yield ours + "attn.qkv_proj.bias", torch.cat(
                [take(attn + "q_proj.bias"), take(attn + "k_proj.bias"), take(attn + "v_proj.bias")])
        yield ours + "attn.o_proj.weight", take(attn + "o_proj.weight")
        yield ours + "post_attn_norm.weight", take(p + "post_attention_layernorm.weight")
        yield ours + "mlp.gate_up_proj.weight", torch.cat(
            [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        yield ours + "mlp.down_proj.weight", take(p + "mlp.down_proj.weight")
    yield "norm.weight", take("model.norm.weight")
    if not config.tie_word_embeddings:
        yield "lm_head.weight", take("lm_head.weight")


def _random_stream(shapes: dict[str, torch.Size], device: torch.device, dtype: torch.dtype,
                   seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Small normal weights (std 0.02) and unit norms: realistic magnitudes for benchmarks.
    Drawn in the whole model's parameter order from one generator, so every part of a split
    model sees the same values as the whole model."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, device=device, dtype=dtype)
        else:
            t = torch.empty(shape, device=device, dtype=dtype)
            t.normal_(0.0, 0.02, generator=gen)
            yield name, t


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, nn.Parameter(tensor, requires_grad=False))


def load_model(source: ModelSource, backend: AttentionBackend, device: torch.device,
               dtype: torch.dtype, seed: int = 0, part: ModelPart | None = None) -> nn.Module:
    """The model (or the `part` of it this process keeps) with its weights on `device`.

    The skeleton is built on the meta device and shaped into the part first; weights then
    stream in one whole tensor at a time and only the part's pieces of each stay, so peak
    memory is the part plus one whole tensor (what a rank of a 70B model needs)."""
    part = part or WholeModel()
    hf_config = hf_config_for(source)
    config = ModelConfig.from_hf(hf_config, source.name)
    with torch.device("meta"):
        whole = LlamaModel(config, backend)
    shapes = {name: p.shape for name, p in whole.named_parameters()}
    model = part.shape(whole)
    del whole
    if source.kind is ModelKind.DUMMY:
        stream = _random_stream(shapes, device, dtype, seed)
        desc = "random weights"
    else:
        stream = _checkpoint_stream(hf_folder_for(source), config)
        desc = "placing weights"
    for name, tensor in tqdm(stream, total=len(shapes), desc=desc, unit="tensor"):
        for local, piece in part.keep(name, tensor):
            _set_parameter(model, local, piece.to(device=device, dtype=dtype))
    # Tied embeddings: one tensor serves both where this part holds both.
    if config.tie_word_embeddings and getattr(model, "embed_tokens", None) is not None \
            and getattr(model, "lm_head", None) is not None:
        model.lm_head.weight = model.embed_tokens.weight
    # Non-persistent buffers (rotary tables) were created on meta: rebuild them on the device.
    model.rotary = model.rotary.__class__(config).to(device)
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    if missing:
        raise ValueError(f"weights missing from the checkpoint: {missing[:5]}")
    return model.eval()
