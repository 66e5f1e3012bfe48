"""Each Triton kernel against its torch reference, on fresh random inputs at awkward sizes."""

from __future__ import annotations

import pytest
import torch

from sarathi_kernels.activation import silu_and_mul, silu_and_mul_ref
from sarathi_kernels.gemv import gemv, linear_ref
from sarathi_kernels.kv_write import write_kv, write_kv_ref
from sarathi_kernels.norm import fused_add_rmsnorm, fused_add_rmsnorm_ref
from sarathi_kernels.paged_attention import paged_attention
from sarathi_kernels.paged_decode import num_splits, paged_decode
from sarathi_kernels.rotary import rotary_, rotary_and_cache_, rotary_ref
from worker_service.attention import AttentionMetadata

DEV = torch.device("cuda")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,cols", [(1, 576), (7, 4096), (33, 3584), (130, 1000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_add_rmsnorm(dtype, rows, cols, with_residual):
    x = torch.randn(rows, cols, device=DEV, dtype=dtype)
    res = torch.randn(rows, cols, device=DEV, dtype=dtype) if with_residual else None
    w = torch.randn(cols, device=DEV, dtype=dtype)
    out, total = fused_add_rmsnorm(x, res, w, 1e-5)
    ref_out, ref_total = fused_add_rmsnorm_ref(x.double(), None if res is None else res.double(),
                                               w.double(), 1e-5)
    assert rel_err(out, ref_out) < TOL[dtype]
    assert rel_err(total, ref_total) < TOL[dtype]


@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_add_rmsnorm_writes_the_sum_into_residual_out_even_in_place(with_residual):
    x = torch.randn(37, 4096, device=DEV, dtype=torch.bfloat16)
    res = torch.randn(37, 4096, device=DEV, dtype=torch.bfloat16) if with_residual else None
    w = torch.randn(4096, device=DEV, dtype=torch.bfloat16)
    ref_out, ref_total = fused_add_rmsnorm(x, res, w, 1e-5)
    target = res if res is not None else torch.zeros_like(x)  # in place over the residual
    out, total = fused_add_rmsnorm(x, None if res is None else res, w, 1e-5, residual_out=target)
    assert total.data_ptr() == target.data_ptr()
    assert torch.equal(out, ref_out) and torch.equal(target, ref_total)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,k", [(1, 6144, 4096), (3, 1000, 4096), (8, 4096, 14336),
                                      (16, 515, 300), (2, 49152, 576)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv(dtype, rows, n, k, with_bias):
    x = torch.randn(rows, k, device=DEV, dtype=dtype)
    w = torch.randn(n, k, device=DEV, dtype=dtype) / k ** 0.5
    b = torch.randn(n, device=DEV, dtype=dtype) if with_bias else None
    ref = linear_ref(x.double(), w.double(), None if b is None else b.double())
    assert rel_err(gemv(x, w, b), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,inter", [(1, 1536), (17, 14336), (5, 1000)])
def test_silu_and_mul(dtype, rows, inter):
    x = torch.randn(rows, 2 * inter, device=DEV, dtype=dtype)
    assert rel_err(silu_and_mul(x), silu_and_mul_ref(x.double())) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 32, 8, 128), (13, 9, 3, 64),
                                                            (130, 28, 4, 128)])
def test_rotary_in_place_on_qkv_views(dtype, tokens, heads, kv_heads, head_dim):
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEV, dtype=dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    freqs = torch.outer(torch.arange(4096, device=DEV, dtype=torch.float32),
                        1.0 / 10000 ** (torch.arange(0, head_dim, 2, device=DEV) / head_dim))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    positions = torch.randint(0, 4096, (tokens,), device=DEV)
    ref_q, ref_k = rotary_ref(q.double(), k.double(), positions, cos.double(), sin.double())
    untouched = qkv[:, (heads + kv_heads) * head_dim:].clone()
    rotary_(q, k, positions, cos, sin)
    assert rel_err(q, ref_q) < TOL[dtype] and rel_err(k, ref_k) < TOL[dtype]
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], untouched)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 32, 8, 128), (13, 9, 3, 64),
                                                            (300, 28, 4, 128)])
def test_rotary_and_cache_matches_rotary_then_write(dtype, tokens, heads, kv_heads, head_dim):
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEV, dtype=dtype)
    q, k, v = (t.view(tokens, -1, head_dim) for t in
               qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1))
    freqs = torch.outer(torch.arange(4096, device=DEV, dtype=torch.float32),
                        1.0 / 500000 ** (torch.arange(0, head_dim, 2, device=DEV) / head_dim))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    positions = torch.randint(0, 4096, (tokens,), device=DEV)
    ref_q, ref_k = rotary_ref(q.double(), k.double(), positions, cos.double(), sin.double())
    cache = torch.randn(64, 2, 16, kv_heads, head_dim, device=DEV, dtype=dtype)
    ref_cache = cache.double()
    slots = torch.randperm(64 * 16, device=DEV)[:tokens]
    slots[1::4] = -1
    write_kv_ref(ref_cache, ref_k, v.double(), slots)
    rotary_and_cache_(q, k, v, positions, cos, sin, cache, slots)
    assert rel_err(q, ref_q) < TOL[dtype] and rel_err(k, ref_k) < TOL[dtype]
    assert rel_err(cache, ref_cache) < TOL[dtype]
    untouched = torch.ones(64 * 16, dtype=torch.bool, device=DEV)
    untouched[slots[slots >= 0]] = False
    flat = cache.transpose(1, 2).reshape(64 * 16, -1)
    ref_flat = ref_cache.transpose(1, 2).reshape(64 * 16, -1)
    assert torch.equal(flat[untouched].double(), ref_flat[untouched])


def test_rotary_and_cache_writes_q_into_q_out_and_leaves_q():
    tokens, heads, kv_heads, head_dim = 65, 32, 8, 128
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEV, dtype=torch.bfloat16)
    q, k, v = (t.view(tokens, -1, head_dim) for t in
               qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1))
    emb = torch.randn(4096, head_dim, device=DEV)
    cos, sin = emb.cos(), emb.sin()
    positions = torch.randint(0, 4096, (tokens,), device=DEV)
    slots = torch.randperm(64 * 16, device=DEV)[:tokens]
    caches = [torch.zeros(64, 2, 16, kv_heads, head_dim, device=DEV, dtype=torch.bfloat16) for _ in range(2)]
    q_before, k2, v2 = q.clone(), k.clone(), v.clone()
    q_out = torch.empty(tokens, heads, head_dim, device=DEV, dtype=torch.bfloat16)
    got = rotary_and_cache_(q, k, v, positions, cos, sin, caches[0], slots, q_out=q_out)
    assert got.data_ptr() == q_out.data_ptr() and torch.equal(q, q_before)
    q_ref = rotary_and_cache_(q_before.clone(), k2, v2, positions, cos, sin, caches[1], slots)
    assert torch.equal(q_out, q_ref) and torch.equal(caches[0], caches[1])


@pytest.mark.parametrize("tokens", [1, 37, 300])
def test_write_kv_skips_negative_slots(tokens):
    num_blocks, block_size, kv_heads, head_dim = 64, 16, 3, 64
    cache = torch.randn(num_blocks, 2, block_size, kv_heads, head_dim, device=DEV, dtype=torch.bfloat16)
    ref = cache.clone()
    kv = torch.randn(tokens, 2 * kv_heads * head_dim, device=DEV, dtype=torch.bfloat16)
    k, v = (t.view(tokens, kv_heads, head_dim) for t in kv.chunk(2, dim=-1))
    slots = torch.randperm(num_blocks * block_size, device=DEV)[:tokens]
    slots[::5] = -1
    write_kv(cache, k, v, slots)
    write_kv_ref(ref, k, v, slots)
    assert torch.equal(cache, ref)


def random_batch(query_lens: list[int], context_lens: list[int], block_size: int, num_blocks: int):
    """Metadata for sequences with disjoint random blocks (each context fully cached)."""
    blocks = torch.randperm(num_blocks).tolist()
    tables = []
    for ctx in context_lens:
        need = -(-ctx // block_size)
        tables.append(blocks[:need])
        blocks = blocks[need:]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    slots = [tables[i][p // block_size] * block_size + p % block_size
             for i, (n, ctx) in enumerate(zip(query_lens, context_lens, strict=True))
             for p in range(ctx - n, ctx)]
    return AttentionMetadata.from_host(starts, list(context_lens), tables, slots, block_size, DEV)


BATCHES = [
    ([1], [1]),                                  # one token, one key
    ([1] * 5, [17, 1, 300, 64, 1000]),           # decodes only, ragged contexts
    ([77], [77]),                                # a whole prompt
    ([50, 1, 1, 200, 1], [150, 33, 517, 200, 2]),  # hybrid: chunks after cached prefixes + decodes
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (9, 3, 64), (4, 4, 32)])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_attention(dtype, heads, kv_heads, head_dim, batch, block_size):
    from worker_service.attention.torch_ref import TorchAttention

    query_lens, context_lens = batch
    meta = random_batch(query_lens, context_lens, block_size, num_blocks=128 * 32 // block_size)
    cache = torch.randn(128 * 32 // block_size, 2, block_size, kv_heads, head_dim, device=DEV,
                        dtype=dtype)
    q = torch.randn(sum(query_lens), heads, head_dim, device=DEV, dtype=dtype)
    scale = head_dim ** -0.5
    ref = TorchAttention().forward(q.double(), cache.double(), meta, scale)
    out = paged_attention(q, cache, meta.block_tables, meta.query_start, meta.context_lens, scale,
                          max(query_lens))
    assert rel_err(out, ref) < TOL[dtype] * (3 if dtype == torch.float32 else 1)


DECODE_CONTEXTS = [[1], [1000], [17, 1, 300, 64, 1000, 2049, 5]]



def test_decode_split_counts_are_powers_of_two_that_the_graph_batch_sizes_already_compile():
    """A hybrid iteration's decodes (any count up to 16) must find their split count compiled
    by the decode graphs (batches 1, 2, 4, 8, 16), or the first such step stalls on a compile."""
    counts = {b: num_splits(b, 8, DEV) for b in range(1, 257)}
    assert all(c & (c - 1) == 0 for c in counts.values())
    assert {counts[b] for b in range(1, 17)} == {counts[b] for b in (1, 2, 4, 8, 16)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("contexts", DECODE_CONTEXTS)
@pytest.mark.parametrize("splits", [1, 3, 16, 32, None])
def test_paged_decode_split_kv(dtype, heads, kv_heads, head_dim, contexts, splits):
    from worker_service.attention.torch_ref import TorchAttention

    meta = random_batch([1] * len(contexts), contexts, 16, num_blocks=512)
    cache = torch.randn(512, 2, 16, kv_heads, head_dim, device=DEV, dtype=dtype)
    q = torch.randn(len(contexts), heads, head_dim, device=DEV, dtype=dtype)
    scale = head_dim ** -0.5
    ref = TorchAttention().forward(q.double(), cache.double(), meta, scale)
    out = paged_decode(q, cache, meta.block_tables, meta.context_lens, scale, splits=splits)
    assert rel_err(out, ref) < TOL[dtype] * (3 if dtype == torch.float32 else 1)


def test_paged_decode_graph_replays_for_new_contexts():
    """The grid depends on the batch alone: a graph captured at one context is right at others."""
    from worker_service.attention.torch_ref import TorchAttention

    heads, kv_heads, head_dim, batch = 32, 8, 128, 2
    cache = torch.randn(512, 2, 16, kv_heads, head_dim, device=DEV, dtype=torch.bfloat16)
    q = torch.randn(batch, heads, head_dim, device=DEV, dtype=torch.bfloat16)
    meta = random_batch([1, 1], [40, 900], 16, num_blocks=512)
    tables = torch.zeros(batch, 512 // batch, dtype=torch.int32, device=DEV)
    context_lens = meta.context_lens.clone()   # the graph's static inputs: tables and lengths
    out = torch.empty_like(q)
    paged_decode(q, cache, tables, context_lens, head_dim ** -0.5, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode(q, cache, tables, context_lens, head_dim ** -0.5, out=out)
    for contexts in ([40, 900], [1, 2000], [1500, 3]):
        meta = random_batch([1, 1], contexts, 16, num_blocks=512)
        context_lens.copy_(meta.context_lens)
        tables.zero_()
        tables[:, :meta.block_tables.shape[1]].copy_(meta.block_tables)
        graph.replay()
        ref = TorchAttention().forward(q.double(), cache.double(), meta, head_dim ** -0.5)
        assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("split_decode_max_batch", [0, 16])
def test_flashinfer_backend(heads, kv_heads, head_dim, batch, split_decode_max_batch):
    pytest.importorskip("flashinfer")
    from worker_service.attention.flashinfer_backend import FlashInferAttention
    from worker_service.attention.torch_ref import TorchAttention

    dtype, block_size = torch.bfloat16, 16
    query_lens, context_lens = batch
    meta = random_batch(query_lens, context_lens, block_size, num_blocks=256)
    cache = torch.randn(256, 2, block_size, kv_heads, head_dim, device=DEV, dtype=dtype)
    q = torch.randn(sum(query_lens), heads, head_dim, device=DEV, dtype=dtype)
    backend = FlashInferAttention(DEV, split_decode_max_batch=split_decode_max_batch)
    backend.configure(heads, kv_heads, head_dim, dtype)
    backend.begin_iteration(meta)
    out = backend.forward(q, cache, meta, head_dim ** -0.5)
    ref = TorchAttention().forward(q.double(), cache.double(), meta, head_dim ** -0.5)
    assert rel_err(out, ref) < TOL[dtype]
