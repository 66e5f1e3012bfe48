"""What streaming through the OpenAI-compatible gateway costs, against the gRPC API directly.

Starts a server (scheduler + worker) and a gateway in front of it, then runs the same workload
both ways, alternating rounds: N concurrent streams (64 by default), each a short prompt with a
fixed number of greedy tokens (EOS ignored). Reports, per path, the time to first token, time
between tokens and whole-request time, and the gateway's own CPU time per token and per request;
the overhead rows are HTTP minus gRPC.

    python -m benchmarks.host.gateway_overhead                 # 64 streams x 64 tokens, 2 rounds
    python -m benchmarks.host.gateway_overhead --streams 16 --max-tokens 32 --rounds 1

The HTTP side uses a minimal asyncio HTTP/1.1 client (no SDK), so the client's own parsing
costs as little as the gRPC side's; on a small machine all three processes share its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from sarathi.client import NO_RETRY, AsyncClient, wait_serving
from sarathi_common.lifecycle import popen_tied
from sarathi_common.net import free_port


@dataclass
class Record:
    start: float
    arrivals: list[float] = field(default_factory=list)  # one per streamed token (chunk)
    end: float = 0.0
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.start

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]


def prompts(n: int) -> list[str]:
    return [f"Request {i}: write a long story about a lighthouse keeper." for i in range(n)]


async def grpc_one(client: AsyncClient, prompt: str, max_tokens: int) -> Record:
    record = Record(time.monotonic())
    async for delta in client.generate(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
        if delta.token_ids:
            record.arrivals.append(time.monotonic())
        if delta.usage is not None:
            record.tokens = delta.usage.completion_tokens
    record.end = time.monotonic()
    return record


async def http_one(port: int, prompt: str, max_tokens: int) -> Record:
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    record = Record(time.monotonic())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"the gateway answered {status!r}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass  # headers
    buffer = b""
    done = False
    while not done:
        size = int((await reader.readline()).strip(), 16)  # chunked transfer encoding
        if size == 0:
            break
        buffer += await reader.readexactly(size)
        await reader.readexactly(2)
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            data = event.removeprefix(b"data: ")
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if chunk["choices"]:
                if chunk["choices"][0]["finish_reason"] is None:
                    record.arrivals.append(time.monotonic())
            else:
                record.tokens = chunk["usage"]["completion_tokens"]
    record.end = time.monotonic()
    writer.close()
    return record


async def run_round(path: str, address: str, http_port: int, n: int, max_tokens: int) -> list[Record]:
    if path == "grpc":
        async with AsyncClient(address, retry=NO_RETRY) as client:
            return await asyncio.gather(*(grpc_one(client, p, max_tokens) for p in prompts(n)))
    return await asyncio.gather(*(http_one(http_port, p, max_tokens) for p in prompts(n)))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Summary:
    requests: int = 0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    tbt_means: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    wall: float = 0.0

    def add(self, records: list[Record], wall: float) -> None:
        self.wall += wall
        for r in records:
            self.requests += 1
            self.tokens += r.tokens
            self.ttft.append(r.ttft)
            self.gaps += r.gaps
            self.tbt_means.append(statistics.fmean(r.gaps))
            self.e2e.append(r.end - r.start)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host.gateway_overhead",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams per round (default 64)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per stream (default 64)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per path, alternating (default 2)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra flag for `sarathi serve` (repeat), e.g. --server-arg=--threads=2")
    args = parser.parse_args(argv)

    port, http_port = free_port(), free_port()
    serve = popen_tied([sys.executable, "-m", "sarathi.cli", "serve", "--port", str(port),
                        "--cpu-cache-gib", "0.5", *args.server_arg],
                       start_new_session=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gateway = popen_tied([sys.executable, "-m", "sarathi.gateway", "--upstream", f"127.0.0.1:{port}",
                          "--port", str(http_port)],
                         stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, 600, serve)
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2).close()
                break
            except OSError:
                time.sleep(0.1)
        # Warm both paths (first-call setup, the model's first batches).
        asyncio.run(run_round("grpc", address, http_port, 4, 4))
        asyncio.run(run_round("http", address, http_port, 4, 4))
        results = {"grpc": Summary(), "http": Summary()}
        gateway_cpu = 0.0
        for _ in range(args.rounds):
            for path in ("grpc", "http"):
                cpu_before = cpu_seconds(gateway.pid)
                start = time.monotonic()
                records = asyncio.run(run_round(path, address, http_port, args.streams, args.max_tokens))
                results[path].add(records, time.monotonic() - start)
                if path == "http":
                    gateway_cpu += cpu_seconds(gateway.pid) - cpu_before
    finally:
        gateway.terminate()
        os.killpg(serve.pid, signal.SIGTERM)
        gateway.wait(10)
        serve.wait(20)
    report(results, gateway_cpu, args)


def mean_diff(a: list[float], b: list[float]) -> float:
    return statistics.fmean(a) - statistics.fmean(b)


def report(results: dict[str, Summary], gateway_cpu: float, args) -> None:
    g, h = results["grpc"], results["http"]
    ms = 1000.0
    print(f"\n{args.streams} concurrent streams x {args.max_tokens} tokens, {args.rounds} rounds per path; "
          f"{machine()}\n")
    print("| path | requests | tokens | mean TTFT | mean TBT | P50 TBT | P99 TBT | mean request | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, s in (("gRPC API", g), ("HTTP gateway", h)):
        print(f"| {name} | {s.requests} | {s.tokens} | {statistics.fmean(s.ttft) * ms:.1f} ms | "
              f"{statistics.fmean(s.tbt_means) * ms:.2f} ms | {pct(s.gaps, 0.5) * ms:.2f} ms | "
              f"{pct(s.gaps, 0.99) * ms:.2f} ms | {statistics.fmean(s.e2e) * ms:.0f} ms | "
              f"{s.tokens / s.wall:.0f} |")
    print()
    print("| overhead of the gateway | value |")
    print("| --- | --- |")
    rows = [("per request: mean TTFT, HTTP - gRPC", f"{mean_diff(h.ttft, g.ttft) * ms:+.1f} ms"),
            ("per request: mean request time, HTTP - gRPC", f"{mean_diff(h.e2e, g.e2e) * ms:+.1f} ms"),
            ("per token: mean TBT, HTTP - gRPC", f"{mean_diff(h.tbt_means, g.tbt_means) * ms:+.2f} ms")]
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"| gateway CPU per token | {gateway_cpu / max(1, h.tokens) * 1e6:.0f} us |")
    print(f"| gateway CPU per request (incl. its tokens) | {gateway_cpu / max(1, h.requests) * ms:.2f} ms |")


if __name__ == "__main__":
    main()
