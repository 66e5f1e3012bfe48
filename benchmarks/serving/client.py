"""Open-loop load client over the real `sarathi.v1.Generation/Generate` stream (grpc.aio).

Open loop: each request is issued at its scheduled arrival whether or not earlier ones have
finished, as independent users would, so a server that falls behind builds a queue and shows it
in TTFT instead of silently slowing the client down. Prompts are random token ids (no tokenizer
on either side, no accidental prefix-cache hits) and every request asks for exactly its workload
length with `ignore_eos`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import grpc
import numpy as np

from benchmarks.serving.records import RequestRecord
from benchmarks.serving.workload import RequestSpec
from protos import generation_pb2, generation_pb2_grpc

# Ids below this are left out of random prompts: small ids are special tokens in most vocabularies.
FIRST_PROMPT_TOKEN_ID = 256
# The first arrival is this far in the future, so setting up the loop does not make it late.
START_LEAD_S = 0.05
STOP_CHECK_INTERVAL_S = 0.1


@dataclass(frozen=True)
class ServerInfo:
    model: str
    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    block_size: int
    device: str

    @staticmethod
    def from_proto(info: generation_pb2.ModelInfoResponse) -> ServerInfo:
        return ServerInfo(
            info.model, info.max_model_len, info.vocab_size, info.num_kv_blocks, info.block_size, info.device
        )


@dataclass(frozen=True)
class ClientOptions:
    seed: int = 0  # of the random prompt token ids
    temperature: float = 0.0  # greedy: sampling cost is not what is being measured
    request_timeout_s: float | None = None


@dataclass(frozen=True)
class Progress:
    total: int
    sent: int
    completed: int
    failed: int


@dataclass
class ClientRun:
    server: ServerInfo
    records: list[RequestRecord]
    stopped_early: str | None  # why the run was cut short, if it was
    clock_start: float  # time.perf_counter() at the run's t = 0


# Called every STOP_CHECK_INTERVAL_S with the records so far and the run clock; returns a reason
# to stop (the probe has already failed its SLO, say) or None to go on.
StopRule = Callable[[Sequence[RequestRecord], float], "str | None"]


def fit_to_context(specs: Sequence[RequestSpec], max_model_len: int) -> list[RequestSpec]:
    """Shortens prompts (then outputs) so that each request fits the model's context."""
    fitted = []
    for spec in specs:
        output = min(spec.num_output_tokens, max(1, max_model_len - 1))
        prompt = min(spec.num_prompt_tokens, max_model_len - output)
        fitted.append(replace(spec, num_prompt_tokens=prompt, num_output_tokens=output))
    return fitted


def prompt_token_ids(spec: RequestSpec, vocab_size: int, seed: int) -> list[int]:
    low = FIRST_PROMPT_TOKEN_ID if vocab_size > 2 * FIRST_PROMPT_TOKEN_ID else 0
    rng = np.random.default_rng([seed, spec.index])
    return rng.integers(low, vocab_size, spec.num_prompt_tokens).tolist()


def build_request(
    spec: RequestSpec, vocab_size: int, options: ClientOptions
) -> generation_pb2.GenerateRequest:
    sampling = generation_pb2.SamplingParams(
        max_tokens=spec.num_output_tokens, temperature=options.temperature, ignore_eos=True
    )
    return generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=prompt_token_ids(spec, vocab_size, options.seed)),
        sampling=sampling,
        request_id=f"bench-{spec.index}",
    )


async def fetch_server_info(address: str, timeout_s: float = 30.0) -> ServerInfo:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        info = await stub.ModelInfo(generation_pb2.ModelInfoRequest(), timeout=timeout_s)
    return ServerInfo.from_proto(info)


async def run_workload(
    address: str,
    specs: Sequence[RequestSpec],
    options: ClientOptions | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    stop_rule: StopRule | None = None,
) -> ClientRun:
    options = options or ClientOptions()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        server = ServerInfo.from_proto(await stub.ModelInfo(generation_pb2.ModelInfoRequest(), timeout=30))
        specs = fit_to_context(specs, server.max_model_len)
        requests = [build_request(spec, server.vocab_size, options) for spec in specs]
        records = [
            RequestRecord(s.index, s.num_prompt_tokens, s.num_output_tokens, s.arrival_s) for s in specs
        ]
        run = _OpenLoopRun(stub, requests, records, options, on_progress, stop_rule)
        stopped_early = await run.run()
    return ClientRun(server, records, stopped_early, run.start)


class _OpenLoopRun:
    def __init__(
        self,
        stub: generation_pb2_grpc.GenerationStub,
        requests: list[generation_pb2.GenerateRequest],
        records: list[RequestRecord],
        options: ClientOptions,
        on_progress: Callable[[Progress], None] | None,
        stop_rule: StopRule | None,
    ) -> None:
        self.stub = stub
        self.requests = requests
        self.records = records
        self.options = options
        self.on_progress = on_progress
        self.stop_rule = stop_rule
        self.start = 0.0
        self.stop = asyncio.Event()
        self.stop_reason: str | None = None
        self.sent = self.completed = self.failed = 0

    def now(self) -> float:
        return time.perf_counter() - self.start

    async def run(self) -> str | None:
        self.start = time.perf_counter() + START_LEAD_S
        watcher = asyncio.create_task(self._watch())
        tasks = []
        for request, record in zip(self.requests, self.records, strict=True):
            delay = record.arrival_s - self.now()
            if delay > 0:
                # Sleeps until the arrival, but wakes at once on an early stop.
                try:
                    await asyncio.wait_for(self.stop.wait(), timeout=delay)
                except asyncio.TimeoutError:
                    pass
            if self.stop.is_set():
                break
            tasks.append(asyncio.create_task(self._one(request, record)))
        all_done = asyncio.gather(*tasks)
        stop_waiter = asyncio.create_task(self.stop.wait())
        await asyncio.wait([all_done, stop_waiter], return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        all_done.cancel()
        await asyncio.gather(all_done, return_exceptions=True)
        stop_waiter.cancel()
        watcher.cancel()
        await asyncio.gather(stop_waiter, watcher, return_exceptions=True)
        for record in self.records:
            if record.sent_s is None:
                record.error = "not sent: stopped early"
        return self.stop_reason

    async def _watch(self) -> None:
        while not self.stop.is_set():
            await asyncio.sleep(STOP_CHECK_INTERVAL_S)
            if self.stop_rule is not None:
                reason = self.stop_rule(self.records, self.now())
                if reason is not None:
                    self.stop_reason = reason
                    self.stop.set()

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(Progress(len(self.records), self.sent, self.completed, self.failed))

    async def _one(self, request: generation_pb2.GenerateRequest, record: RequestRecord) -> None:
        call = self.stub.Generate(request, timeout=self.options.request_timeout_s)
        record.sent_s = self.now()
        self.sent += 1
        self._report()
        try:
            async for response in call:
                received = self.now()
                event = response.WhichOneof("event")
                if event == "chunk" and response.chunk.token_ids:
                    record.chunk_times_s.append(received)
                    record.chunk_num_tokens.append(len(response.chunk.token_ids))
                elif event == "finished":
                    _record_finished(record, response.finished, received)
        except grpc.aio.AioRpcError as e:
            record.error = f"{e.code().name}: {e.details()}"
        except asyncio.CancelledError:
            call.cancel()  # the server aborts the request and frees its KV blocks
            record.error = "cancelled: stopped early"
            raise
        finally:
            self._settle(record, "stream ended without a Finished message")

    def _settle(self, record: RequestRecord, missing_end: str) -> None:
        """A request's stream is over: count it completed or failed (an end never seen is a
        failure, named by `missing_end`) and report progress."""
        if record.finished_s is None and record.error is None:
            record.error = missing_end
        if record.completed:
            self.completed += 1
        else:
            self.failed += 1
        self._report()


def _record_finished(record: RequestRecord, finished: generation_pb2.Finished, received: float) -> None:
    record.finished_s = received
    record.finish_reason = generation_pb2.FinishReason.Name(finished.reason)
    record.num_completion_tokens = finished.usage.completion_tokens
    record.scheduling_delay_s = server_scheduling_delay_s(finished)


def server_scheduling_delay_s(finished: generation_pb2.Finished) -> float | None:
    """Arrival at the scheduler to first scheduling, if the server's proto reports it (asked for
    as `Finished.scheduling_delay_ns`); the client alone cannot see it."""
    if "scheduling_delay_ns" not in finished.DESCRIPTOR.fields_by_name:
        return None
    return finished.scheduling_delay_ns / 1e9  # type: ignore[attr-defined]
