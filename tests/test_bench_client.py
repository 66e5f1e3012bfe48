"""The load client over a real gRPC stream, against a small in-process Generation service
that streams a known number of tokens (the real server is in test_bench_e2e.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent import futures

import grpc
import pytest

from benchmarks.serving.cli import main_bench
from benchmarks.serving.client import ClientOptions, Progress, run_workload
from benchmarks.serving.slo import EarlyFailRule, Slo
from benchmarks.serving.workload import RequestSpec
from protos import generation_pb2, generation_pb2_grpc

MAX_MODEL_LEN = 256
VOCAB_SIZE = 1000


class TokenStreamer(generation_pb2_grpc.GenerationServicer):
    """Streams max_tokens tokens, one message each, `gap_s` apart; records what it was sent."""

    def __init__(self, gap_s: float = 0.002) -> None:
        self.gap_s = gap_s
        self.requests: list[generation_pb2.GenerateRequest] = []
        self.cancelled = threading.Event()
        self.lock = threading.Lock()

    def ModelInfo(self, request, context):
        return generation_pb2.ModelInfoResponse(
            model="streamer",
            max_model_len=MAX_MODEL_LEN,
            vocab_size=VOCAB_SIZE,
            block_size=16,
            num_kv_blocks=64,
        )

    def Generate(self, request, context):
        with self.lock:
            self.requests.append(request)
        streamed_all = threading.Event()
        # Runs when the call ends for any reason; a cancelled call never reaches the end.
        context.add_callback(lambda: streamed_all.is_set() or self.cancelled.set())
        for i in range(request.sampling.max_tokens):
            time.sleep(self.gap_s)
            yield generation_pb2.GenerateResponse(chunk=generation_pb2.TokenChunk(token_ids=[i], text="x"))
        usage = generation_pb2.Usage(
            prompt_tokens=len(request.token_ids.ids), completion_tokens=request.sampling.max_tokens
        )
        finished = generation_pb2.Finished(reason=generation_pb2.FINISH_REASON_LENGTH, usage=usage)
        streamed_all.set()
        yield generation_pb2.GenerateResponse(finished=finished)


@pytest.fixture
def streamer():
    servicer = TokenStreamer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_every_token_message_and_the_finish_are_recorded(streamer):
    servicer, address = streamer
    specs = [RequestSpec(i, 10 + i, 5, arrival_s=0.01 * i) for i in range(4)]
    run = asyncio.run(run_workload(address, specs))
    assert run.stopped_early is None and run.server.max_model_len == MAX_MODEL_LEN
    for record in run.records:
        assert record.completed and record.finish_reason == "FINISH_REASON_LENGTH"
        assert record.chunk_num_tokens == [1] * 5 and record.num_completion_tokens == 5
        assert len(record.tbt_gaps_s) == 4
        assert record.ttft_s > 0 and record.sent_s >= record.arrival_s
        assert (
            record.chunk_times_s == sorted(record.chunk_times_s)
            and record.finished_s >= record.chunk_times_s[-1]
        )


def test_requests_carry_the_workload_lengths_as_token_ids_with_ignore_eos(streamer):
    servicer, address = streamer
    asyncio.run(run_workload(address, [RequestSpec(0, 17, 3, 0.0)], ClientOptions(seed=5)))
    (request,) = servicer.requests
    assert len(request.token_ids.ids) == 17 and all(0 <= t < VOCAB_SIZE for t in request.token_ids.ids)
    assert request.sampling.max_tokens == 3 and request.sampling.ignore_eos
    assert request.sampling.temperature == 0.0


def test_prompts_longer_than_the_context_are_shortened_to_fit(streamer):
    servicer, address = streamer
    run = asyncio.run(run_workload(address, [RequestSpec(0, 10 * MAX_MODEL_LEN, 6, 0.0)]))
    assert len(servicer.requests[0].token_ids.ids) == MAX_MODEL_LEN - 6
    assert run.records[0].num_prompt_tokens == MAX_MODEL_LEN - 6


def test_progress_reports_end_with_everything_finished(streamer):
    _, address = streamer
    reports: list[Progress] = []
    asyncio.run(
        run_workload(address, [RequestSpec(i, 4, 2, 0.0) for i in range(3)], on_progress=reports.append)
    )
    assert reports[-1] == Progress(total=3, sent=3, completed=3, failed=0)


def test_an_early_stop_cancels_streams_and_leaves_later_requests_unsent(streamer):
    servicer, address = streamer
    servicer.gap_s = 0.05
    # Request 0 streams for seconds; request 1 is due long after the rule fires.
    specs = [RequestSpec(0, 4, 200, 0.0), RequestSpec(1, 4, 2, 60.0)]
    run = asyncio.run(
        run_workload(address, specs, stop_rule=lambda records, now: "enough" if now > 0.3 else None)
    )
    assert run.stopped_early == "enough"
    assert run.records[0].error.startswith("cancelled") and 0 < run.records[0].num_received_tokens < 200
    assert run.records[1].error.startswith("not sent") and run.records[1].sent_s is None
    assert servicer.cancelled.wait(5)


def test_early_fail_rule_ends_an_overloaded_run(streamer):
    servicer, address = streamer
    servicer.gap_s = 0.05
    specs = [RequestSpec(i, 4, 50, 0.0) for i in range(2)]
    rule = EarlyFailRule(Slo(p99_tbt_s=0.01), [s.num_output_tokens for s in specs])
    run = asyncio.run(run_workload(address, specs, stop_rule=rule))
    assert "P99 TBT" in run.stopped_early
    assert not any(r.completed for r in run.records)


def test_bench_command_against_an_address_writes_json_csv_and_plots(streamer, tmp_path):
    _, address = streamer
    argv = ["--address", address, "--num-requests", "6", "--rate", "50", "--lengths", "uniform"]
    argv += [
        "--prompt-tokens",
        "4:32",
        "--output-tokens",
        "3:6",
        "--output-dir",
        str(tmp_path),
        "--label",
        "t",
    ]
    assert main_bench(argv + ["--no-progress"]) == 0
    document = json.loads((tmp_path / "t.json").read_text())
    assert document["summary"]["num_completed"] == 6
    assert document["metadata"]["workload"]["num_requests"] == 6
    assert len((tmp_path / "t_requests.csv").read_text().splitlines()) == 7
    for name in ("t_ttft_cdf.png", "t_tbt_cdf.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
