"""Model hyperparameters in our own frozen form, read from a Hugging Face config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_model_len: int
    tie_word_embeddings: bool
    attention_bias: bool               # Qwen2-style q/k/v bias
    eos_token_ids: tuple[int, ...]
    # Raw HF config, kept only to build rotary frequencies with transformers' own rope functions
    # (default, llama3, linear, dynamic, yarn scaling).
    hf_config: Any = field(repr=False, compare=False, hash=False, default=None)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf_config: Any, name: str) -> ModelConfig:
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        num_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        eos = getattr(text, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        model_type = getattr(text, "model_type", "llama")
        bias = bool(getattr(text, "attention_bias", model_type == "qwen2"))
        return cls(
            name=name,
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=text.rms_norm_eps,
            max_model_len=text.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=bias,
            eos_token_ids=eos_ids,
            hf_config=text,
        )
