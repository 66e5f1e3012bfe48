"""Soak: mixed load for minutes against a real server, with cancels and bad requests.

Starts `sarathi serve` (CPU, the embedded model) unless --address names one, then keeps
--concurrency requests in flight for --minutes: prompts of random length (text and chat), random
max_tokens, greedy and sampled; --cancel-rate of them are cancelled after a random number of
tokens, --bad-rate are bad requests (each must get INVALID_ARGUMENT). Prints a table: requests
served, errors by status, resident memory of the server's processes at start and end, and KV
blocks still held once the load stops (a leak if not 0).

    python -m benchmarks.host.soak                   # 10 minutes, 16 streams
    python -m benchmarks.host.soak --minutes 1 --concurrency 8
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import psutil
from tqdm import tqdm

from protos import generation_pb2 as pb
from protos import generation_pb2_grpc
from sarathi.client import wait_serving
from sarathi_common.lifecycle import popen_tied
from sarathi_common.net import free_port

WORDS = ("the lighthouse keeper wrote a letter about storms ships gulls and the long winter "
         "nights while the lamp turned slowly above a grey and restless sea").split()

BAD = [
    pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(temperature=float("nan"))),
    pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(top_p=1.5)),
    pb.GenerateRequest(chat=pb.ChatPrompt(messages=[pb.ChatMessage(role="wizard", content="hi")])),
    pb.GenerateRequest(),
    pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=10**9)),
    pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 10_000_000])),
]


def good_request(rnd: random.Random) -> pb.GenerateRequest:
    text = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 300)))
    sampling = pb.SamplingParams(max_tokens=rnd.randint(1, 96), ignore_eos=rnd.random() < 0.5)
    if rnd.random() < 0.5:
        sampling.temperature, sampling.top_p, sampling.seed = 0.8, 0.95, rnd.randint(0, 2**31)
    else:
        sampling.temperature = 0.0
    if rnd.random() < 0.3:
        chat = pb.ChatPrompt(messages=[pb.ChatMessage(role="user", content=text)])
        return pb.GenerateRequest(chat=chat, sampling=sampling)
    return pb.GenerateRequest(text=text, sampling=sampling)


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.tokens = 0

    def add(self, outcome: str, tokens: int = 0) -> None:
        with self.lock:
            self.counts[outcome] += 1
            self.tokens += tokens


def run_one(stub, rnd: random.Random, args, tally: Tally) -> None:
    roll = rnd.random()
    if roll < args.bad_rate:
        try:
            for _ in stub.Generate(rnd.choice(BAD), timeout=60):
                pass
            tally.add("bad request answered OK (wrong)")
        except grpc.RpcError as e:
            tally.add(f"bad request -> {e.code().name}")
        return
    cancel_after = rnd.randint(0, 20) if roll < args.bad_rate + args.cancel_rate else None
    call = stub.Generate(good_request(rnd), timeout=300)
    tokens = 0
    try:
        for msg in call:
            if msg.HasField("chunk"):
                tokens += len(msg.chunk.token_ids)
                if cancel_after is not None and tokens >= cancel_after:
                    call.cancel()
        tally.add("served", tokens)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.CANCELLED and cancel_after is not None:
            tally.add("cancelled (by the soak)", tokens)
        else:
            tally.add(f"error {e.code().name}: {e.details()[:60]}")


def server_rss(pid: int) -> dict[str, float]:
    root = psutil.Process(pid)
    out = {"frontend": root.memory_info().rss / 2**20}
    for child in root.children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            name = "worker" if "worker_service" in cmd else "engine" if "spawn_main" in cmd else None
            if name:
                out[name] = child.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return out


def kv_blocks_used(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("sarathi_kv_blocks_used "):
            return float(line.split()[1])
    raise RuntimeError("no sarathi_kv_blocks_used in the metrics")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--cancel-rate", type=float, default=0.10)
    parser.add_argument("--bad-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    port, metrics_port = free_port(), free_port()
    server = popen_tied([sys.executable, "-m", "sarathi.cli", "serve", "--port", str(port),
                         "--metrics-port", str(metrics_port), "--chunk-size", "256"],
                        start_new_session=True,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = f"127.0.0.1:{port}"
        wait_serving(address, timeout=600, proc=server)
        stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(address))
        rss_start = server_rss(server.pid)
        tally = Tally()
        end = time.monotonic() + args.minutes * 60

        def loop(i: int) -> None:
            rnd = random.Random(args.seed * 1000 + i)
            while time.monotonic() < end:
                run_one(stub, rnd, args, tally)

        threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(args.concurrency)]
        for t in threads:
            t.start()
        with tqdm(total=int(args.minutes * 60), unit="s", desc="soak") as bar:
            while any(t.is_alive() for t in threads):
                time.sleep(1)
                bar.n = min(bar.total, int(args.minutes * 60 - max(0.0, end - time.monotonic())))
                bar.set_postfix(requests=sum(tally.counts.values()), tokens=tally.tokens)
        deadline = time.monotonic() + 30
        while kv_blocks_used(metrics_port) and time.monotonic() < deadline:
            time.sleep(0.5)
        leaked = kv_blocks_used(metrics_port)
        rss_end = server_rss(server.pid)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
    print(f"\nsoak: {args.minutes:g} min, {args.concurrency} streams, {args.cancel_rate:.0%} cancels, "
          f"{args.bad_rate:.0%} bad requests, {os.cpu_count()} CPUs")
    print(f"{'outcome':<60} {'count':>8}")
    for outcome, n in sorted(tally.counts.items()):
        print(f"{outcome:<60} {n:>8}")
    print(f"{'tokens streamed':<60} {tally.tokens:>8}")
    print(f"\n{'process':<10} {'RSS start MiB':>14} {'RSS end MiB':>12}")
    for name in rss_start:
        print(f"{name:<10} {rss_start[name]:>14.0f} {rss_end.get(name, float('nan')):>12.0f}")
    print(f"\nKV blocks held after the load stopped: {leaked:.0f}")
    wrong = [k for k in tally.counts if k.startswith("error") or "(wrong)" in k]
    sys.exit(1 if leaked or wrong else 0)


if __name__ == "__main__":
    main()
