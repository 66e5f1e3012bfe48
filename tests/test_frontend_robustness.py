"""The frontend under input that used to freeze or surprise it (issue 21): a huge prompt is
tokenized off the event loop, so other streams keep flowing and health answers; the message
limit is a few MiB unless raised; a second server on a busy port exits with one line."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from conftest import ROOT, collect, greedy_request, start_server, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import generation_pb2 as pb


@pytest.fixture(scope="module")
def big_message_server():
    server = start_server("--chunk-size", "64", "--max-message-mb", "20")
    yield server
    server.stop()


def finished_by_reason(server) -> dict[str, float]:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^sarathi_requests_finished_total\{reason="(\w+)"\} (\S+)$', text, re.M)}


def test_kv_gauges_are_set_before_the_first_request(big_message_server):
    metrics = big_message_server.metrics()
    assert metrics["sarathi_kv_blocks_total"] > 0
    assert metrics["sarathi_kv_blocks_used"] == 0


def test_cancelled_and_timed_out_requests_are_counted_by_reason(big_message_server):
    stub = big_message_server.stub()
    before = finished_by_reason(big_message_server)
    call = stub.Generate(greedy_request([100, 200, 300], 500))
    next(call)
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.Generate(greedy_request([100, 200, 300], 500), timeout=1.0))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    collect(stub.Generate(greedy_request([100, 200], 2)))

    def counted() -> bool:
        after = finished_by_reason(big_message_server)
        return all(after.get(r, 0) - before.get(r, 0) == 1 for r in ("cancelled", "timeout", "length"))

    assert wait_for(counted, timeout=10), (before, finished_by_reason(big_message_server))
    assert wait_for(lambda: big_message_server.metrics()["sarathi_kv_blocks_used"] == 0)


def _stream_gaps(stub, prompt: list[int], n: int, gaps: list[float], errors: list[BaseException]) -> None:
    try:
        last = time.monotonic()
        for msg in stub.Generate(greedy_request(prompt, n), timeout=120):
            now = time.monotonic()
            if msg.HasField("chunk"):
                gaps.append(now - last)
            last = now
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


@pytest.mark.slow   # about 30-50 s: make test stays under 15 minutes on 2 cores
def test_huge_prompt_does_not_stall_other_streams_or_health(big_message_server):
    server = big_message_server
    stub = server.stub()
    # 16 MiB of text (the limit raised by the flag) is refused at once, without parsing or
    # tokenizing it: no prompt the context can hold takes that many bytes.
    huge = "All work and no play makes Jack a dull boy. " * (16 * 2**20 // 44)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.Generate(pb.GenerateRequest(text=huge), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in err.value.details()
    assert time.monotonic() - start < 3
    del huge
    # 600,000 CJK characters may fit, so they are tokenized (about 1.6 million tokens, over a
    # second each on a CI core); three at once used to stall the event loop, every stream and
    # health check, for several seconds.
    rnd = random.Random(0)
    cjk = "".join(chr(rnd.randint(0x4E00, 0x9FFF)) for _ in range(600_000))
    # Now with four streams running and health polled throughout.
    gaps: list[list[float]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_stream_gaps, args=(stub, [100 + i, 200, 300], 150, gaps[i], errors))
               for i in range(4)]
    for t in threads:
        t.start()
    assert wait_for(lambda: all(len(g) >= 5 for g in gaps), timeout=60)
    health_times: list[float] = []
    stop = threading.Event()

    def poll_health() -> None:
        with grpc.insecure_channel(server.address) as channel:
            h = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    status = h.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                except grpc.RpcError as e:
                    errors.append(e)
                    return
                if status != health_pb2.HealthCheckResponse.SERVING:
                    errors.append(AssertionError(f"health said {status}"))
                health_times.append(time.monotonic() - t0)
                time.sleep(0.05)

    poller = threading.Thread(target=poll_health)
    poller.start()
    before = [len(g) for g in gaps]
    big_errors: list[grpc.RpcError] = []

    def big_request() -> None:
        try:
            collect(stub.Generate(pb.GenerateRequest(text=cjk, sampling=pb.SamplingParams(max_tokens=1)),
                                  timeout=120))
        except grpc.RpcError as e:
            big_errors.append(e)

    start = time.monotonic()
    bigs = [threading.Thread(target=big_request) for _ in range(3)]
    for t in bigs:
        t.start()
    for t in bigs:
        t.join(120)
    busy_s = time.monotonic() - start
    assert len(big_errors) == 3
    assert all(e.code() == grpc.StatusCode.INVALID_ARGUMENT and "context" in e.details() for e in big_errors)
    stop.set()
    poller.join(10)
    for t in threads:
        t.join(120)
    assert not errors, errors
    during = [g for i, gs in enumerate(gaps) for g in gs[before[i]:]]
    normal = sorted(g for i, gs in enumerate(gaps) for g in gs[1:before[i]])
    typical = normal[len(normal) // 2]
    print(f"tokenizing beside streams {busy_s:.2f} s; typical gap "
          f"{typical * 1e3:.0f} ms, largest {max(during) * 1e3:.0f} ms; "
          f"health {len(health_times)} checks, slowest "
          f"{max(health_times) * 1e3:.0f} ms")
    # Generous on a shared 2-core machine; the stall this guards against lasts the whole
    # tokenization (seconds), on the event loop.
    assert len(health_times) >= 3
    assert max(health_times) < 1.0
    assert max(during) < max(1.0, 5 * typical)


def test_default_message_limit_is_a_few_mib(default_server):
    text = "x" * (5 * 2**20)
    with pytest.raises(grpc.RpcError) as err:
        collect(default_server.stub().Generate(pb.GenerateRequest(text=text), timeout=60))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    tokens, _, _ = collect(default_server.stub().Generate(greedy_request([100, 200], 2)))
    assert len(tokens) == 2


def test_second_server_on_a_busy_port_exits_with_one_line(default_server):
    port = default_server.address.rsplit(":", 1)[1]
    proc = subprocess.run([sys.executable, "-m", "sarathi.cli", "serve", "--port", port, "--threads", "1",
                           "--cpu-cache-gib", "0.1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "in use" in line]
    assert lines, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_16_and_100_mb_prompts_beside_8_streams_stall_nothing_and_memory_returns():
    """With the message limit raised to 128 MiB: prompts too large for any context are refused
    by their size, before they are parsed on the event loop; the other streams keep their pace,
    health answers throughout, and the frontend's memory comes back afterwards."""
    import psutil

    server = start_server("--chunk-size", "64", "--max-message-mb", "128")
    raw_channel = grpc.insecure_channel(server.address)
    try:
        stub = server.stub()
        frontend = psutil.Process(server.proc.pid)
        collect(stub.Generate(greedy_request([1, 2, 3], 4)))
        rss_start = frontend.memory_info().rss
        gaps: list[list[tuple[float, float]]] = [[] for _ in range(8)]
        errors: list[BaseException] = []

        def stream(i: int) -> None:
            try:
                last = time.monotonic()
                for msg in stub.Generate(greedy_request([100 + i, 200, 300], 250), timeout=600):
                    now = time.monotonic()
                    if msg.HasField("chunk"):
                        gaps[i].append((now, now - last))
                    last = now
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)

        health_times: list[float] = []
        done = threading.Event()

        def poll_health() -> None:
            with grpc.insecure_channel(server.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                while not done.is_set():
                    t0 = time.monotonic()
                    try:
                        health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    except grpc.RpcError as e:
                        errors.append(e)
                        return
                    health_times.append(time.monotonic() - t0)
                    time.sleep(0.05)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        threads.append(threading.Thread(target=poll_health))
        for t in threads:
            t.start()
        assert wait_for(lambda: all(len(g) >= 10 for g in gaps), timeout=120)
        windows = []
        # Each big request is built and encoded before its window: doing that in this process
        # holds its GIL for a good part of a second at 100 MB, which stalls the streams' own
        # timestamps here, not the server (CI saw 593 ms against 2 x 271 ms that way).
        generate_raw = raw_channel.unary_stream("/sarathi.v1.Generation/Generate",
                                                request_serializer=None,
                                                response_deserializer=pb.GenerateResponse.FromString)
        before_big = time.monotonic()
        for mb in (16, 100):
            data = pb.GenerateRequest(
                text="All work and no play makes Jack a dull boy. " * (mb * 2**20 // 44)).SerializeToString()
            time.sleep(1)
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                collect(generate_raw(data, timeout=120))
            windows.append((start, time.monotonic()))
            del data
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "bytes: no prompt that fits" in err.value.details()
            time.sleep(2)
        done.set()
        for t in threads:
            t.join(600)
        assert not errors, errors
        every = sorted((t, g) for gs in gaps for t, g in gs[1:])
        normal = max(g for t, g in every if t < before_big)   # the largest gap before the big prompts
        during = [max((g for t, g in every if a <= t <= b + 0.5), default=0.0) for a, b in windows]
        rss_end = frontend.memory_info().rss
        print(f"largest gap before {normal * 1e3:.0f} ms, during 16/100 MB "
              f"{during[0] * 1e3:.0f}/{during[1] * 1e3:.0f} ms; health {len(health_times)} checks, "
              f"slowest {max(health_times) * 1e3:.0f} ms; frontend RSS {rss_start / 2**20:.0f} -> "
              f"{rss_end / 2**20:.0f} MiB")
        # What this guards is work on the frontend's event loop (tokenizing 16 MB takes tens of
        # seconds, parsing 100 MB ~0.05 s): a bound of a second above the normal gap. Moving 100 MB
        # over loopback also takes CPU from the worker on a 2-core box, which CI saw as a 655 ms
        # gap against a 172 ms normal one; a ratio to the normal gap measured that, not a stall.
        assert max(during) <= normal + 1.0
        assert max(health_times) < 1.0
        assert rss_end <= 1.2 * rss_start
        tokens, _, _ = collect(stub.Generate(greedy_request([100, 200], 2)))
        assert len(tokens) == 2
    finally:
        raw_channel.close()
        server.stop()
