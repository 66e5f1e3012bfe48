"""What streaming through `sarathi router` costs, against calling its scheduler directly.

Starts one server (scheduler + worker) and a router in front of it alone, then runs the same
workload both ways, alternating rounds, at each concurrency: N concurrent greedy streams, each a
short prompt with a fixed number of tokens (EOS ignored). Reports time to first token, time
between tokens and whole-request time per path, the differences (the router's share), and the
router's own CPU time per token and per request. It also times what decoding and re-encoding each
response would add, which the router avoids by passing responses through as bytes.

    python -m benchmarks.host.router_overhead                       # 64 and 256 streams x 16 tokens
    python -m benchmarks.host.router_overhead --streams 16 --max-tokens 8 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
import timeit

from benchmarks.host.gateway_overhead import Summary, cpu_seconds, grpc_one, machine, mean_diff, pct, prompts
from protos import generation_pb2 as pb
from sarathi.client import NO_RETRY, AsyncClient, wait_serving
from sarathi_common.lifecycle import popen_tied
from sarathi_common.net import free_port


async def run_round(address: str, n: int, max_tokens: int):
    async with AsyncClient(address, retry=NO_RETRY) as client:
        return await asyncio.gather(*(grpc_one(client, p, max_tokens) for p in prompts(n)))


def decode_cost_us() -> float:
    """Parsing and serializing one token's response: what a decoding router would add."""
    data = pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=[1234], text=" lighthouse")).SerializeToString()
    n = 200_000
    seconds = timeit.timeit(lambda: pb.GenerateResponse.FromString(data).SerializeToString(), number=n)
    return seconds / n * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host.router_overhead",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="64,256", help="concurrent streams, comma-separated "
                                                           "(default 64,256)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per stream (default 16)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per path, alternating (default 2)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra flag for `sarathi serve` (repeat), e.g. --server-arg=--threads=2")
    args = parser.parse_args(argv)
    concurrency = [int(n) for n in args.streams.split(",")]

    port, router_port = free_port(), free_port()
    serve = popen_tied([sys.executable, "-m", "sarathi.cli", "serve", "--port", str(port),
                        "--cpu-cache-gib", "2", "--max-queue", "100000", *args.server_arg],
                       start_new_session=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    router = popen_tied([sys.executable, "-m", "router_service", "--port", str(router_port),
                         "--scheduler", f"127.0.0.1:{port}"],
                        stderr=subprocess.DEVNULL)
    direct, routed = f"127.0.0.1:{port}", f"127.0.0.1:{router_port}"
    results: dict[int, dict[str, Summary]] = {}
    router_cpu: dict[int, float] = {}
    try:
        wait_serving(direct, 600, serve)
        wait_serving(routed, 60, router)
        for address in (direct, routed):   # first-call setup, the model's first batches
            asyncio.run(run_round(address, 4, 4))
        for n in concurrency:
            results[n] = {"direct": Summary(), "router": Summary()}
            router_cpu[n] = 0.0
            for _ in range(args.rounds):
                for path, address in (("direct", direct), ("router", routed)):
                    cpu_before = cpu_seconds(router.pid)
                    start = time.monotonic()
                    records = asyncio.run(run_round(address, n, args.max_tokens))
                    results[n][path].add(records, time.monotonic() - start)
                    if path == "router":
                        router_cpu[n] += cpu_seconds(router.pid) - cpu_before
    finally:
        router.send_signal(signal.SIGTERM)
        os.killpg(serve.pid, signal.SIGTERM)
        router.wait(40)
        serve.wait(40)
    report(results, router_cpu, decode_cost_us(), args)


def report(results: dict[int, dict[str, Summary]], router_cpu: dict[int, float], decode_us: float,
           args) -> None:
    ms = 1000.0
    print(f"\n{args.max_tokens} tokens per stream, {args.rounds} rounds per path and concurrency; "
          f"{machine()}\n")
    print("| streams | path | requests | mean TTFT | mean TBT | P50 TBT | P99 TBT | mean request "
          "| tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, by_path in results.items():
        for path, s in by_path.items():
            print(f"| {n} | {path} | {s.requests} | {statistics.fmean(s.ttft) * ms:.1f} ms | "
                  f"{statistics.fmean(s.tbt_means) * ms:.2f} ms | {pct(s.gaps, 0.5) * ms:.2f} ms | "
                  f"{pct(s.gaps, 0.99) * ms:.2f} ms | {statistics.fmean(s.e2e) * ms:.0f} ms | "
                  f"{s.tokens / s.wall:.0f} |")
    print()
    print("| overhead of the router | " + " | ".join(f"{n} streams" for n in results) + " |")
    print("| --- |" + " --- |" * len(results))
    rows = {
        "per request: mean TTFT, router - direct":
            lambda d, r, cpu: f"{mean_diff(r.ttft, d.ttft) * ms:+.1f} ms",
        "per request: mean request time, router - direct":
            lambda d, r, cpu: f"{mean_diff(r.e2e, d.e2e) * ms:+.1f} ms",
        "per token: mean TBT, router - direct":
            lambda d, r, cpu: f"{mean_diff(r.tbt_means, d.tbt_means) * ms:+.2f} ms",
        "router CPU per token": lambda d, r, cpu: f"{cpu / max(1, r.tokens) * 1e6:.0f} us",
        "router CPU per request (incl. its tokens)":
            lambda d, r, cpu: f"{cpu / max(1, r.requests) * ms:.2f} ms",
    }
    for name, cell in rows.items():
        print(f"| {name} | " + " | ".join(cell(s["direct"], s["router"], router_cpu[n])
                                          for n, s in results.items()) + " |")
    print(f"\ndecoding and re-encoding one response message (avoided: responses pass as bytes): "
          f"{decode_us:.2f} us")


if __name__ == "__main__":
    main()
