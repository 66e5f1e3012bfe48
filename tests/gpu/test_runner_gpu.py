"""The full runner on the GPU (flashinfer / triton backends, CUDA graphs on and off) against the
torch reference backend on the same random weights of SmolLM2-135M's shape.

Random weights give flat logits with many near-ties, so bf16 runs may pick a different token
where the reference's top two logits are close; each sequence is compared up to its first
disagreement, which must be such a near-tie. float32 runs must agree exactly on tokens.
"""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks.step.harness import BLOCK, PlanMaker, drive, launch_ahead
from protos.batch_plan import BatchPlan
from sarathi_common.model_spec import resolve
from worker_service.attention import make_backend
from worker_service.models.loader import load_model
from worker_service.runner import ModelRunner

DEV = torch.device("cuda")
PROMPT_LENS = [5, 16, 17, 90, 200, 33, 1, 64]
NEW_TOKENS = 12


def make_runner(backend: str, dtype: torch.dtype, graphs: bool, hybrid_tokens: int = 0) -> ModelRunner:
    torch.manual_seed(0)
    model = load_model(resolve("dummy:smollm2-135m"), make_backend(backend, DEV), DEV, dtype, seed=1)
    runner = ModelRunner(model, DEV, dtype, cuda_graphs=graphs, graph_batch_sizes=(1, 2, 4, 8),
                         hybrid_graph_tokens=hybrid_tokens)
    runner.init_cache(len(PROMPT_LENS) * 32, BLOCK)
    return runner


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(1, 49152, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def compare(ref: tuple[dict, dict], got: tuple[dict, dict], exact: bool, tie_gap: float) -> None:
    ref_tokens, ref_logits = ref
    got_tokens, got_logits = got
    for sid, want in ref_tokens.items():
        have = got_tokens[sid]
        if exact:
            assert have == want, f"seq {sid}"
        for j, (a, b) in enumerate(zip(want, have, strict=True)):
            r, g = ref_logits[sid][j], got_logits[sid][j]
            err = ((g - r).norm() / r.norm()).item()
            assert err < (1e-4 if exact else 3e-2), f"seq {sid} token {j}: logits off by {err:.2e}"
            if a != b:
                top2 = r.topk(2).values
                assert (top2[0] - top2[1]).item() < tie_gap, f"seq {sid} token {j}: not a near-tie"
                break  # the sequences now differ: later tokens are not comparable


@pytest.fixture(scope="module")
def torch_bf16():
    return drive(make_runner("torch", torch.bfloat16, graphs=False), prompts(), NEW_TOKENS)


@pytest.mark.parametrize("backend", ["flashinfer", "triton"])
@pytest.mark.parametrize("graphs", [False, True])
def test_bf16_matches_torch_reference(torch_bf16, backend, graphs):
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    got = drive(make_runner(backend, torch.bfloat16, graphs), prompts(), NEW_TOKENS)
    compare(torch_bf16, got, exact=False, tie_gap=0.1)


@pytest.mark.parametrize("graphs", [False, True])
def test_float32_triton_is_exact(graphs):
    ref = drive(make_runner("torch", torch.float32, graphs=False), prompts(), NEW_TOKENS)
    got = drive(make_runner("triton", torch.float32, graphs), prompts(), NEW_TOKENS)
    compare(ref, got, exact=True, tie_gap=0.0)


@pytest.mark.parametrize("backend", ["flashinfer", "triton"])
def test_piecewise_hybrid_graphs_match_torch_reference(torch_bf16, backend):
    """Iterations with prefill chunks replayed as graphs cut at attention (--hybrid-graph-tokens)."""
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    runner = make_runner(backend, torch.bfloat16, True, hybrid_tokens=128)
    assert runner.hybrid_graphs is not None and runner.hybrid_graphs.graphs
    compare(torch_bf16, drive(runner, prompts(), NEW_TOKENS), exact=False, tie_gap=0.1)


@pytest.mark.parametrize("split_max", [0, 16])
@pytest.mark.parametrize("hybrid_tokens", [0, 128])
def test_hybrid_decodes_through_the_decode_kernels_match_torch_reference(torch_bf16, split_max,
                                                                         hybrid_tokens):
    """Hybrid iterations run their decodes apart from their chunks: through FlashInfer's decode
    wrapper (split_max 0) or our split-KV kernel (16), eagerly and between hybrid graph pieces."""
    pytest.importorskip("flashinfer")
    runner = make_runner("flashinfer", torch.bfloat16, True, hybrid_tokens=hybrid_tokens)
    runner.backend.split_decode_max_batch = split_max
    runner.graphs = None   # decode-only steps eager too, so the decode wrapper plans for both
    compare(torch_bf16, drive(runner, prompts(), NEW_TOKENS), exact=False, tie_gap=0.1)


@pytest.mark.parametrize("hybrid_tokens", [0, 128])
def test_hybrid_chunks_through_the_triton_kernel_match_torch_reference(torch_bf16, hybrid_tokens):
    """With triton_chunk_max_tokens set, the FlashInfer backend's prefill chunks run through our
    Triton kernel (its decodes as before), eagerly and between hybrid graph pieces."""
    pytest.importorskip("flashinfer")
    runner = make_runner("flashinfer", torch.bfloat16, True, hybrid_tokens=hybrid_tokens)
    runner.backend.triton_chunk_max_tokens = 1 << 20
    compare(torch_bf16, drive(runner, prompts(), NEW_TOKENS), exact=False, tie_gap=0.1)


def test_hybrid_iterations_compile_no_triton_kernel_once_started():
    """Serving never waits for a Triton compile (seconds each on a fresh machine): a hybrid
    iteration's few decodes run the split-KV kernel eagerly, with a block table as wide as that
    iteration's longest (1, 3 and 7 blocks here), on the variants the decode graphs compiled at
    start-up. (On a cold H200 the first probe at 14 req/s broke the TBT bound that a warmed
    machine held; this was one such compile per split count and table-width class.)"""
    pytest.importorskip("flashinfer")
    knobs = pytest.importorskip("triton.knobs")
    runner = make_runner("flashinfer", torch.bfloat16, True, hybrid_tokens=128)
    assert runner.backend.split_decode_max_batch >= 5   # the decodes below take the split-KV kernel
    maker = PlanMaker()
    # Prefills of at most 128 tokens each (hybrid graphs), then decodes beside a new prompt.
    plans = [maker.new_sequences(1, 5), maker.new_sequences(2, 40), maker.new_sequences(1, 100),
             maker.new_sequences(1, 100)]
    plans += [maker.hybrid([0], 8), maker.hybrid([0, 1, 2], 30), maker.hybrid([0, 1, 2, 3, 4], 64)]
    compiled: list[str] = []
    knobs.runtime.jit_post_compile_hook = lambda **kw: compiled.append(kw["repr"])
    try:
        for plan in plans:
            runner.execute(plan)
    finally:
        knobs.runtime.jit_post_compile_hook = None
    assert not compiled, "compiled while serving:\n" + "\n".join(compiled)


def serving_runner() -> tuple[ModelRunner, PlanMaker]:
    """A FlashInfer runner with decode and hybrid graphs and room for a few hundred sequences,
    after its first prefill (sequence 0), as a worker starts serving."""
    pytest.importorskip("flashinfer")
    torch.manual_seed(0)
    model = load_model(resolve("dummy:smollm2-135m"), make_backend("flashinfer", DEV), DEV,
                       torch.bfloat16, seed=1)
    runner = ModelRunner(model, DEV, torch.bfloat16, graph_batch_sizes=(1, 2, 4, 8),
                         hybrid_graph_tokens=128)
    runner.init_cache(4096, BLOCK)
    maker = PlanMaker()
    runner.execute(maker.new_sequences(1, 20))
    return runner, maker


def _allocator_growth() -> tuple[int, int]:
    """(device segments ever allocated, pinned host blocks ever allocated): each one a
    cudaMalloc or cudaHostAlloc, which waits for the whole device."""
    host = torch.cuda.host_memory_stats()
    pinned = host.get("num_host_alloc", host.get("allocations.allocated", 0))
    return torch.cuda.memory_stats()["segment.all.allocated"], pinned


def test_serving_larger_batches_grows_no_allocator_once_started():
    """Batches larger than any before (more logits, wider block tables and uploads) are served
    from what the allocators cached at start-up: a cudaMalloc or cudaHostAlloc mid-serving
    waits for the device to drain, and every stream in flight misses a turn."""
    runner, maker = serving_runner()
    runner.execute(maker.decode([0]))   # one small step of each kind: lazily made state
    runner.execute(maker.hybrid([0], 20))
    torch.cuda.synchronize()
    before = _allocator_growth()
    for n in (4, 16, 64, 160):
        while maker.next_seq < n:   # prefills of up to 1920 tokens, within the step's budget
            runner.execute(maker.new_sequences(min(32, n - maker.next_seq), 60))
        seqs = list(range(maker.next_seq))
        runner.execute(maker.decode(seqs))
        runner.execute(maker.hybrid(seqs, 100))
    torch.cuda.synchronize()
    assert _allocator_growth() == before


def test_launching_a_step_with_more_sampled_rows_than_ever_does_not_wait_for_the_device():
    """The host queues step i+1 while the device runs step i. A kernel CUDA loads on its first
    launch (cuBLAS picks the LM head's kernel by row count) waits for the whole device; so each
    batch size is launched behind 0.2 s of queued device work and must return well before it."""
    runner, maker = serving_runner()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    cycles = int(10_000_000 * 200 / start.elapsed_time(end))  # ~0.2 s of device work
    waited = {}
    for n in range(2, 100, 7):
        while maker.next_seq < n:
            runner.execute(maker.new_sequences(min(32, n - maker.next_seq), 20))
        seqs = list(range(maker.next_seq))
        for plan in (maker.decode(seqs), maker.hybrid(seqs, 100)):
            torch.cuda._sleep(cycles)
            t = time.perf_counter()
            step = runner.launch(plan)
            waited[(n, len(plan.seq_ids))] = time.perf_counter() - t
            runner.finish(step)
    slow = {k: f"{v * 1e3:.0f} ms" for k, v in waited.items() if v > 0.1}
    assert not slow, f"launch waited for the device at (sequences, rows): {slow}"


def test_graphs_match_eager_flashinfer():
    pytest.importorskip("flashinfer")
    eager = drive(make_runner("flashinfer", torch.bfloat16, False), prompts(), NEW_TOKENS)
    graph = drive(make_runner("flashinfer", torch.bfloat16, True), prompts(), NEW_TOKENS)
    assert eager[0] == graph[0]


def test_profile_free_memory_leaves_room_for_the_cache():
    model = load_model(resolve("dummy:smollm2-135m"), make_backend("auto", DEV), DEV, torch.bfloat16)
    runner = ModelRunner(model, DEV, torch.bfloat16, graph_batch_sizes=(1, 2, 4))
    budget = runner.profile_free_memory(4096, fraction=0.5)
    free, total = torch.cuda.mem_get_info()
    assert 0 < budget < free
    blocks = budget // runner.bytes_per_block(BLOCK)
    runner.init_cache(blocks, BLOCK)  # must fit, graphs included
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", ["flashinfer", "triton"])
@pytest.mark.parametrize("graphs", [False, True])
def test_launching_ahead_matches_one_step_at_a_time(backend, graphs):
    """As the worker serves: step i+1 is launched before step i's tokens reach the host, so its
    decodes read their input tokens on the device (through the graphs' static buffers too)."""
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")

    def plans() -> list[BatchPlan]:
        maker = PlanMaker()
        out = [maker.new_sequences(3, 40), maker.new_sequences(2, 77)]
        out += [maker.decode([0, 1, 2, 3, 4]) for _ in range(10)]
        out += [maker.decode([1, 3]), maker.decode([0, 2, 4]), maker.decode([0, 1, 2, 3, 4])]
        return out

    serial = make_runner(backend, torch.float32 if backend == "triton" else torch.bfloat16, graphs)
    want = [serial.execute(p).token_ids for p in plans()]
    ahead = make_runner(backend, torch.float32 if backend == "triton" else torch.bfloat16, graphs)
    assert launch_ahead(ahead, plans()) == want
