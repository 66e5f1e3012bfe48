"""The Llama family (Llama 2/3, Mistral, Yi, Qwen2 with q/k/v bias, tied embeddings) in plain torch.

Our layout fuses q/k/v into one projection and gate/up into another, so each layer reads its
input once per projection group. The model's signature stays `forward(input_ids, positions,
kv_caches, meta)`: only attention reads the paged-cache metadata.

On CUDA the memory-bound pieces run as Triton kernels from sarathi_kernels/ (residual add fused into
RMSNorm, rotary in place, SiLU-and-mul); everywhere else they are the torch ops below, which
stay the exact reference path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker_service.attention import AttentionBackend, AttentionMetadata
from worker_service.models.config import ModelConfig


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except that skinny CUDA inputs (a decode batch of at most 16 rows, bf16/fp16)
    go to sarathi_kernels/gemv.py, which streams the weight faster than cuBLAS does at that shape."""
    if x.is_cuda and x.dim() == 2 and x.shape[0] <= 16 and x.dtype in (torch.bfloat16, torch.float16) \
            and weight.dtype == x.dtype:
        from sarathi_kernels.gemv import gemv

        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear through `linear` (the gemv kernel for decode batches on GPUs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual); a None residual counts as zero.
        residual_out: where x + residual is written (residual itself may be given), or None."""
        if x.is_cuda:
            from sarathi_kernels.norm import fused_add_rmsnorm

            return fused_add_rmsnorm(x, residual, self.weight, self.eps, residual_out)
        if residual is not None:
            x = x + residual
        if residual_out is not None:
            x = residual_out.copy_(x)
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as the reference implementation does, then cast back.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, built with transformers' rope functions (all scalings)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq = _inv_freq(config)
        positions = torch.arange(config.max_model_len, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = _attention_scaling(config)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if q.is_cuda:
            from sarathi_kernels.rotary import rotary_

            rotary_(q, k, positions, self.cos, self.sin)  # in place, in float32
            return q, k
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_type(config: ModelConfig) -> str:
    params = getattr(config.hf_config, "rope_parameters", None) or getattr(
        config.hf_config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) or "default"


def _inv_freq(config: ModelConfig) -> torch.Tensor:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = _rope_type(config)
    if rope_type == "default":
        params = getattr(config.hf_config, "rope_parameters", None) or {}
        theta = params.get("rope_theta", getattr(config.hf_config, "rope_theta", 10000.0))
        exponents = torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim
        return 1.0 / (theta ** exponents)
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config.hf_config, "cpu")
    return inv_freq.float()


def _attention_scaling(config: ModelConfig) -> float:
    if _rope_type(config) == "default":
        return 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    _, scaling = ROPE_INIT_FUNCTIONS[_rope_type(config)](config.hf_config, "cpu")
    return float(scaling)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.qkv_proj = Linear(config.hidden_size, config.q_size + 2 * config.kv_size,
                                  bias=config.attention_bias)
        self.o_proj = Linear(config.q_size, config.hidden_size, bias=False)
        self.backend = backend
        self.scale = config.head_dim ** -0.5

    def project(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                kv_cache: torch.Tensor, meta: AttentionMetadata, q_out: torch.Tensor | None = None
                ) -> torch.Tensor:
        """q/k/v projection and rotary; stores k, v in the cache. -> q [tokens, heads, head_dim],
        packed, in q_out where given (a graph's static buffer).
        Reads only meta.slot_mapping, so it can run inside a CUDA graph of fixed token count."""
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if q.is_cuda and self.backend.writes_kv_by_slot:
            from sarathi_kernels.rotary import rotary_and_cache_

            # One launch rotates q (into a packed tensor: attention takes q packed) and k, and
            # stores k, v in the cache.
            packed = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
            return rotary_and_cache_(q, k, v, positions, rotary.cos, rotary.sin, kv_cache,
                                     meta.slot_mapping, q_out=packed)
        q, k = rotary(q, k, positions)
        self.backend.write_kv(kv_cache, k, v, meta)
        return q if q_out is None else q_out.copy_(q)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """The paged attention itself: the only part that reads the iteration's batch layout.
        out: where to write it (e.g. a graph's static buffer), or None for a new tensor."""
        return self.backend.forward(q, kv_cache, meta, self.scale, out=out)

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        return self.o_proj(attn.reshape(attn.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if gate_up.is_cuda:
            from sarathi_kernels.activation import silu_and_mul

            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, backend)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                rotary: RotaryEmbedding, kv_cache: torch.Tensor, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's input delta, running residual) -> the same for the next layer.

        Carrying the residual separately lets each norm fuse the preceding add; the sums are
        the same additions in the same order as x + attn(...) then x + mlp(...).
        """
        q, residual = self.begin(x, residual, positions, rotary, kv_cache, meta)
        return self.end(self.attn.attend(q, kv_cache, meta), residual)

    def begin(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
              rotary: RotaryEmbedding, kv_cache: torch.Tensor, meta: AttentionMetadata,
              residual_out: torch.Tensor | None = None, q_out: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to attention: (input delta, residual) -> (q, residual); the outputs written into
        residual_out and q_out where given (static buffers of piecewise graphs)."""
        h, residual = self.input_norm(x, residual, residual_out)
        return self.attn.project(h, positions, rotary, kv_cache, meta, q_out), residual

    def end(self, attn: torch.Tensor, residual: torch.Tensor, residual_out: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """From attention's output: -> (this layer's output delta, residual), the residual in
        residual_out where given."""
        h, residual = self.post_attn_norm(self.attn.output(attn), residual, residual_out)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.backend = backend  # shared by every layer; the runner plans it once per iteration
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleList(DecoderLayer(config, backend) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden]."""
        x = self.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, positions, self.rotary, kv_cache, meta)
        return x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head, only for the rows that sample. Logits in float32."""
        return self.lm_head(self.norm(hidden)[0]).float()
