"""The scheduler's own per-iteration trace (sarathi.v1.Operator/GetTrace) for a bench run:
iteration time and batch make-up, iteration by iteration, as JSON rows and a PNG."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from protos import generation_pb2, generation_pb2_grpc  # noqa: E402


@dataclass
class Iteration:
    step_id: int
    start_s: float            # since the run's first iteration
    duration_s: float         # scheduling began -> result applied (with overlap, includes
                              # waiting for the previous iteration)
    period_s: float           # since the previous iteration's result: one iteration's cost
    num_prefill_tokens: int
    num_decode_tokens: int
    num_preempted: int
    kv_blocks_used: int
    num_waiting: int
    worker_forward_ms: float  # host time launching the forward (the forward itself on a CPU)
    worker_idle_ms: float     # the device sat idle before this step (CUDA events on a GPU)
    worker_device_ms: float   # the step's own time on the device
    predicted_ms: float = 0.0  # the latency model's device time when it was formed (0: none)
    # Sequences that decoded in the iteration before and again later, but not in this one: each
    # stretches a stream's time between tokens to two iterations or more.
    decodes_skipped: int = 0


async def last_step_id(address: str) -> int | None:
    """The newest iteration so far (None if the server has no Operator service)."""
    trace = await _get_trace(address, limit=1)
    if trace is None:
        return None
    return trace[-1].step_id if trace else 0


async def iterations_since(address: str, after_step: int) -> list[Iteration]:
    trace = await _get_trace(address, limit=0) or []
    chosen = [it for it in trace if it.step_id > after_step]
    t0 = chosen[0].start_s if chosen else 0.0
    ends = [it.start_s + it.duration_s for it in chosen]
    periods = [it.duration_s if i == 0 else ends[i] - ends[i - 1] for i, it in enumerate(chosen)]
    skipped = decodes_skipped([list(it.decode_seq_ids) for it in chosen])
    return [Iteration(it.step_id, it.start_s - t0, it.duration_s, period, it.num_prefill_tokens,
                      it.num_decode_tokens, it.num_preempted, it.kv_blocks_used, it.num_waiting,
                      it.worker_forward_ns / 1e6, it.worker_idle_ns / 1e6, it.worker_device_ns / 1e6,
                      it.predicted_ms, n)
            for it, period, n in zip(chosen, periods, skipped, strict=True)]


def decodes_skipped(decode_ids: list[list[int]]) -> list[int]:
    """Per iteration, how many sequences decoded in the one before and in a later one, but not
    in it (a stall of that stream, whatever its cause)."""
    last_seen: dict[int, int] = {}
    skipped = [0] * len(decode_ids)
    for i, ids in enumerate(decode_ids):
        for seq in ids:
            prev = last_seen.get(seq)
            if prev is not None:
                for j in range(prev + 1, i):
                    skipped[j] += 1
            last_seen[seq] = i
    return skipped


async def _get_trace(address: str, limit: int):
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.OperatorStub(channel)
        try:
            response = await stub.GetTrace(generation_pb2.GetTraceRequest(limit=limit), timeout=30)
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE):
                return None
            raise
    return list(response.iterations)


def as_rows(iterations: list[Iteration]) -> list[dict]:
    return [asdict(it) for it in iterations]


def plot_iterations(iterations: list[Iteration], title: str, path: Path) -> None:
    """Top: each iteration's time and its device time; bottom: its prefill and decode tokens. A
    prefill-first scheduler shows as tall spikes with no decode tokens under them."""
    fig, (times, tokens) = plt.subplots(2, 1, figsize=(8, 5), dpi=120, sharex=True)
    x = [it.start_s for it in iterations]
    times.plot(x, [1000 * it.period_s for it in iterations], ".-", markersize=2, linewidth=0.6,
               label="iteration")
    # The gap between the two lines is time the device waited for the host.
    times.plot(x, [it.worker_device_ms for it in iterations], "-", linewidth=0.6, label="device")
    times.legend(fontsize=8, loc="upper right")
    times.set_ylabel("iteration (ms)")
    times.set_title(title)
    times.grid(alpha=0.3)
    decode = [it.num_decode_tokens for it in iterations]
    prefill = [it.num_prefill_tokens for it in iterations]
    width = max(1e-3, (x[-1] - x[0]) / max(1, len(x)) * 0.9) if x else 1.0
    tokens.bar(x, decode, width=width, label="decode tokens", color="C0")
    tokens.bar(x, prefill, width=width, bottom=decode, label="prefill tokens", color="C1")
    tokens.set_ylabel("tokens")
    tokens.set_xlabel("time since the first iteration (s)")
    tokens.legend(fontsize=8, loc="upper right")
    tokens.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
