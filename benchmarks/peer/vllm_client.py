"""The open-loop client of benchmarks/serving, pointed at an in-process vLLM engine instead of
a gRPC stub: the same arrival schedule, stop rule, progress callback and clock (seconds from the
run's start; TTFT from the scheduled arrival), and the same RequestRecords, so every metric and
SLO check downstream is shared with our server's runs.

The prompts are the ones our client sends: `vllm_prompts` gives, for the same RequestSpecs and
seed, exactly the token ids `build_request` puts on the wire.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from benchmarks.peer.vllm_engine import StreamOutput, VllmEngine
from benchmarks.serving.client import (
    ClientOptions,
    ClientRun,
    Progress,
    ServerInfo,
    StopRule,
    _OpenLoopRun,
    fit_to_context,
    prompt_token_ids,
)
from benchmarks.serving.records import RequestRecord
from benchmarks.serving.workload import RequestSpec


def apply_stream_output(record: RequestRecord, received_s: float, output: StreamOutput) -> None:
    """Folds one streamed output into the record as our gRPC client folds a TokenChunk and the
    Finished message: vLLM's last output carries the last tokens and the finish together."""
    if output.num_new_tokens > 0:
        record.chunk_times_s.append(received_s)
        record.chunk_num_tokens.append(output.num_new_tokens)
    if output.finished:
        record.finished_s = received_s
        record.finish_reason = output.finish_reason
        record.num_completion_tokens = record.num_received_tokens


def vllm_prompts(specs: Sequence[RequestSpec], vocab_size: int, seed: int) -> list[list[int]]:
    return [prompt_token_ids(spec, vocab_size, seed) for spec in specs]


class _EngineOpenLoopRun(_OpenLoopRun):
    """_OpenLoopRun's schedule and stopping, with one request sent to the engine."""

    def __init__(
        self,
        engine: VllmEngine,
        prompts: list[list[int]],
        records: list[RequestRecord],
        on_progress: Callable[[Progress], None] | None,
        stop_rule: StopRule | None,
    ) -> None:
        super().__init__(None, prompts, records, ClientOptions(), on_progress, stop_rule)  # type: ignore[arg-type]
        self.engine = engine

    async def _one(self, request: list[int], record: RequestRecord) -> None:  # type: ignore[override]
        record.sent_s = self.now()
        self.sent += 1
        self._report()
        try:
            async for output in self.engine.stream(request, record.num_output_tokens):
                apply_stream_output(record, self.now(), output)
        except asyncio.CancelledError:
            record.error = "cancelled: stopped early"  # the engine aborts it and frees its blocks
            raise
        except Exception as e:  # the engine refused or failed the request: a failed request
            record.error = f"{type(e).__name__}: {e}"
        finally:
            self._settle(record, "stream ended without a finished output")


async def run_engine_workload(
    engine: VllmEngine,
    specs: Sequence[RequestSpec],
    info: ServerInfo,
    seed: int,
    on_progress: Callable[[Progress], None] | None = None,
    stop_rule: StopRule | None = None,
) -> ClientRun:
    """run_workload's counterpart: fits the specs to the model's context the same way, sends
    the same prompt ids, returns the same ClientRun."""
    specs = fit_to_context(specs, info.max_model_len)
    records = [RequestRecord(s.index, s.num_prompt_tokens, s.num_output_tokens, s.arrival_s) for s in specs]
    prompts = vllm_prompts(specs, info.vocab_size, seed)
    run = _EngineOpenLoopRun(engine, prompts, records, on_progress, stop_rule)
    stopped_early = await run.run()
    return ClientRun(info, records, stopped_early, run.start)
