"""shard_weight, the one slicing rule of tensor parallelism, as properties over model shapes and
TP sizes: the ranks' pieces put back together are the whole weight, and the row-parallel
products summed over ranks are the whole product."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worker_service.models.config import ModelConfig
from worker_service.parallel.tensor_parallel import head_shard, shard_weight


@st.composite
def shapes(draw) -> tuple[ModelConfig, int]:
    """A GQA model shape and a TP size it splits over (KV heads split, or replicated)."""
    tp = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    if draw(st.booleans()):
        kv_heads = tp * draw(st.integers(1, 2))                   # KV heads split over ranks
    else:
        kv_heads = draw(st.sampled_from([d for d in range(1, tp + 1) if tp % d == 0]))  # replicated
    group = draw(st.integers(1, 3)) * (max(tp // kv_heads, 1))
    heads = kv_heads * group
    head_dim = draw(st.sampled_from([2, 4]))
    config = ModelConfig(
        name="prop", vocab_size=draw(st.integers(tp, 40)), hidden_size=draw(st.integers(2, 12)),
        intermediate_size=tp * draw(st.integers(1, 4)), num_layers=1, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-5, max_model_len=64,
        tie_word_embeddings=False, attention_bias=draw(st.booleans()), eos_token_ids=(0,))
    return config, tp


def pieces(name: str, whole: torch.Tensor, config: ModelConfig, tp: int) -> list[torch.Tensor]:
    return [shard_weight(name, whole, config, r, tp) for r in range(tp)]


@settings(max_examples=60, deadline=None)
@given(shapes())
def test_column_and_vocab_pieces_concatenate_to_the_whole(shape):
    c, tp = shape
    h, d = c.hidden_size, c.head_dim
    qkv = torch.randn(c.q_size + 2 * c.kv_size, h)
    parts = pieces("layers.0.attn.qkv_proj.weight", qkv, c, tp)
    q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size])
    local = [head_shard(c.num_heads, c.num_kv_heads, r, tp) for r in range(tp)]
    assert torch.equal(torch.cat([p[:s.num_heads * d] for p, s in zip(parts, local, strict=True)]), q)
    for p, s in zip(parts, local, strict=True):   # each rank's KV heads are those its q heads read
        kv_rows = slice(s.kv_lo * d, (s.kv_lo + s.num_kv_heads) * d)
        assert torch.equal(p[s.num_heads * d:(s.num_heads + s.num_kv_heads) * d], k[kv_rows])
        assert torch.equal(p[(s.num_heads + s.num_kv_heads) * d:], v[kv_rows])
        group = c.num_heads // c.num_kv_heads
        assert s.kv_lo == s.q_lo // group
    assert {s.kv_lo + i for s in local for i in range(s.num_kv_heads)} == set(range(c.num_kv_heads))
    if c.attention_bias:
        bias = torch.randn(c.q_size + 2 * c.kv_size)
        got = pieces("layers.0.attn.qkv_proj.bias", bias, c, tp)
        assert torch.equal(torch.cat([b[:s.num_heads * d] for b, s in zip(got, local, strict=True)]),
                           bias[:c.q_size])

    gate_up = torch.randn(2 * c.intermediate_size, h)
    parts = pieces("layers.0.mlp.gate_up_proj.weight", gate_up, c, tp)
    gate, up = gate_up.chunk(2)
    assert torch.equal(torch.cat([p.chunk(2)[0] for p in parts]), gate)
    assert torch.equal(torch.cat([p.chunk(2)[1] for p in parts]), up)

    for name in ("embed_tokens.weight", "lm_head.weight"):
        table = torch.randn(c.vocab_size, h)
        assert torch.equal(torch.cat(pieces(name, table, c, tp)), table)
    norm = torch.randn(h)
    assert all(p is norm for p in pieces("layers.0.input_norm.weight", norm, c, tp))


@settings(max_examples=60, deadline=None)
@given(shapes(), st.integers(1, 5))
def test_row_parallel_products_sum_to_the_whole_product(shape, rows):
    c, tp = shape
    o_proj = torch.randn(c.hidden_size, c.q_size, dtype=torch.float64)
    down = torch.randn(c.hidden_size, c.intermediate_size, dtype=torch.float64)
    attn = torch.randn(rows, c.q_size, dtype=torch.float64)
    act = torch.randn(rows, c.intermediate_size, dtype=torch.float64)
    local = [head_shard(c.num_heads, c.num_kv_heads, r, tp) for r in range(tp)]
    # Each rank multiplies its own heads' attention output (its q heads) by its o_proj columns.
    o_sum = sum(attn[:, s.q_lo * c.head_dim:(s.q_lo + s.num_heads) * c.head_dim] @ w.T
                for s, w in zip(local, pieces("layers.0.attn.o_proj.weight", o_proj, c, tp), strict=True))
    assert torch.allclose(o_sum, attn @ o_proj.T)
    inter = c.intermediate_size // tp
    d_sum = sum(act[:, r * inter:(r + 1) * inter] @ w.T
                for r, w in enumerate(pieces("layers.0.mlp.down_proj.weight", down, c, tp)))
    assert torch.allclose(d_sum, act @ down.T)
    for w in pieces("layers.0.mlp.down_proj.weight", down, c, tp):   # fresh, so `down` can go
        assert tp == 1 or w.untyped_storage().data_ptr() != down.untyped_storage().data_ptr()
