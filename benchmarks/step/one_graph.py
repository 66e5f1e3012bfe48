"""A hybrid iteration as one CUDA graph, attention included: what full-iteration graphs would
buy over the piecewise graphs the worker serves with (attention eager between the pieces).

One plan is formed and planned once, then the whole forward (the pieces run eagerly inside the
capture, FlashInfer's decode and prefill kernels on that plan), the LM head over the sampled
rows and a greedy pick are captured together and replayed back to back. The replays reuse that
one plan (the same KV is rewritten each time), so the time is a bound: kernels plus in-graph
gaps, without the per-iteration uploads and planning a served full graph would still need.
"""

from __future__ import annotations

import torch

from benchmarks.step.driver import DEV, Driver
from worker_service.attention import AttentionMetadata
from worker_service.upload import upload


def one_graph_seconds(driver: Driver, decodes: int, chunk: int, context: int, replays: int) -> float:
    """Device seconds per replay of `decodes` decodes at `context` plus a `chunk`-token first
    chunk of a new prompt, captured whole."""
    runner = driver.runner
    hybrid = runner.hybrid_graphs
    assert hybrid is not None, "needs the runner's hybrid graphs (their static buffers)"
    sids = driver.cached([context] * decodes)
    sid, new = driver.add(chunk + 64)
    plan = driver.plan([new], [(s, 1) for s in sids] + [(sid, chunk)])
    runner._apply_membership(plan)
    batch = runner._prepare(plan)
    assert batch is not None
    n = len(batch.input_ids)
    meta = AttentionMetadata.from_host(batch.query_start, batch.context_lens, batch.tables,
                                       batch.slots, runner.block_size, DEV)
    padded = hybrid.load(upload(batch.input_ids, torch.int64, DEV), batch.positions, batch.slots)
    runner.backend.begin_iteration(meta)
    rows = upload(batch.sample_rows, torch.int64, DEV)

    def iteration() -> torch.Tensor:
        hidden = hybrid.run(padded, n, meta)
        return runner.model.compute_logits(hidden[rows]).argmax(-1)

    piecewise, hybrid.capture_graphs = hybrid.capture_graphs, False  # pieces eager, inside
    try:
        for _ in range(2):  # compile and autotune outside the capture
            iteration()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            iteration()
    finally:
        hybrid.capture_graphs = piecewise
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    del graph
    driver.pending_drops.append(sid)
    del driver.seqs[sid]
    driver.drop_all()
    return start.elapsed_time(end) / 1e3 / replays
