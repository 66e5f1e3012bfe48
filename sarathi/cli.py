"""`sarathi`: one command for every role. `serve` runs a whole replica locally; `scheduler` and
`worker` run the two services apart (other hosts too); `generate` and `demo` are clients."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- worker ---------------------------------------------------------------------------------
HYBRID_GRAPH_TOKENS = 512  # the default: the largest size measured on an H100


def add_worker_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("worker")
    g.add_argument("--model", default=None,
                   help="a .gguf file, a Hugging Face folder, or dummy:NAME (llama3-8b, mistral-7b, "
                        "qwen2.5-7b, llama3-70b, smollm2-135m, tiny); "
                        "default: the embedded SmolLM2-135M-Instruct")
    g.add_argument("--device", default=None, help="cpu or cuda[:N]; default: cuda if present, else cpu")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights and KV cache; default: float32 on cpu, bfloat16 on cuda")
    g.add_argument("--attention", default="auto", choices=["auto", "torch", "flashinfer", "triton"],
                   help="attention backend; auto: torch on cpu, flashinfer (else triton) on cuda")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--cpu-cache-gib", type=float, default=2.0,
                   help="on the CPU, the most memory the KV cache may take (GiB)")
    g.add_argument("--weights-seed", type=int, default=0, help="seed of dummy weights")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="run decode iterations eagerly (default: CUDA graphs on GPUs)")
    g.add_argument("--hybrid-graph-tokens", type=int, default=None,
                   help="on GPUs, also run iterations with prefill chunks of up to this many tokens "
                        f"as piecewise CUDA graphs, cut at attention (default {HYBRID_GRAPH_TOKENS}, the "
                        "size measured on an H100; under `serve` at most --chunk-size; 0: off)")
    g = p.add_argument_group("replica layout (tensor and pipeline parallelism)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks sharing each stage's layers")
    g.add_argument("--pipeline-parallel-size", type=int, default=1, help="stages, each a slice of the layers")
    g.add_argument("--rank", type=int, default=0,
                   help="this worker's rank in the replica (stage * TP size + TP rank); rank 0 serves gRPC")
    g.add_argument("--replica-addresses", default=None,
                   help="host:port of every rank's ZeroMQ mailbox, comma-separated, in rank order")
    g.add_argument("--dist-init", default=None, help="host:port of torch.distributed's store (rank 0's host)")


def run_worker(args: argparse.Namespace) -> None:
    import torch

    from sarathi.model_spec import resolve
    from worker_service.attention import make_backend
    from worker_service.models.loader import load_model
    from worker_service.runner import ModelRunner
    from worker_service.server import serve_worker

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    source = resolve(args.model)
    if args.tensor_parallel_size * args.pipeline_parallel_size > 1:
        from sarathi.lifecycle import dies_with_this_process
        from worker_service.parallel.service import run_replica_worker

        if args.rank == 0 and args.replica_addresses is None and args.dist_init is None:
            # The whole replica on this host: ranks 1..n are this process's children.
            peers = [subprocess.Popen(cmd, preexec_fn=dies_with_this_process())
                     for cmd in local_peer_commands(args)]
            threading.Thread(target=exit_with_failed_peer, args=(peers,), daemon=True).start()

        def load(rank_device, part):  # each rank reads only its part, on its own GPU
            return load_model(source, make_backend(args.attention, rank_device), rank_device, dtype,
                              seed=args.weights_seed, part=part)

        return run_replica_worker(args, load, device, dtype)
    start = time.monotonic()
    model = load_model(source, make_backend(args.attention, device), device, dtype, seed=args.weights_seed)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    graphs = device.type == "cuda" and not args.no_cuda_graphs
    if not graphs:
        hybrid_tokens = 0
    elif args.hybrid_graph_tokens is None:
        hybrid_tokens = HYBRID_GRAPH_TOKENS
    else:
        hybrid_tokens = args.hybrid_graph_tokens
    runner = ModelRunner(model, device, dtype, cuda_graphs=graphs, hybrid_graph_tokens=hybrid_tokens)
    server = serve_worker(runner, args.host, args.port, weight_bytes, int(args.cpu_cache_gib * (1 << 30)))
    print(f"worker: {source.name} on {device} ({dtype}), {weight_bytes / 1e6:.0f} MB of weights, "
          f"loaded in {time.monotonic() - start:.1f} s; listening on {args.host}:{args.port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()


# --- scheduler ------------------------------------------------------------------------------
def add_scheduler_args(p: argparse.ArgumentParser) -> None:
    from scheduler_service.policies import POLICIES

    g = p.add_argument_group("scheduler")
    g.add_argument("--policy", default="sarathi",
                   choices=list(POLICIES),
                   help="scheduling policy (default: sarathi; see docs/policies.md): sarathi = "
                        "chunked prefills beside decodes, never stalling them; sarathi_dynamic = "
                        "sarathi with the chunk shrunk to --target-iteration-ms; vllm = "
                        "prefill-first, whole prompts, decodes stall; orca = whole prompts mixed "
                        "with decodes; faster_transformer = request-level batches; "
                        "simple_chunking = chunked prefills and decodes in alternate iterations")
    g.add_argument("--chunk-size", type=int, default=512,
                   help="token budget per iteration: prompts are prefilled in chunks of at most this "
                        "(for vllm, orca, faster_transformer: the most tokens of whole prompts per "
                        "iteration; a longer prompt runs as the iteration's only one)")
    g.add_argument("--target-iteration-ms", type=float, default=50.0,
                   help="sarathi_dynamic: shrink the prefill chunk so that an iteration's predicted "
                        "time stays within this (default: 50)")
    g.add_argument("--min-chunk-size", type=int, default=32,
                   help="sarathi_dynamic: the smallest prefill chunk (default: 32)")
    g.add_argument("--watermark", type=float, default=0.01,
                   help="share of KV blocks that admitting new requests leaves free for running "
                        "ones (default: 0.01)")
    g.add_argument("--num-host-kv-blocks", type=int, default=0,
                   help="host-memory KV blocks for preemption by swapping (default 0: recompute)")
    g.add_argument("--prefix-caching", action="store_true",
                   help="reuse the KV of full blocks shared with earlier prompts (default: off)")
    g.add_argument("--max-batch-size", type=int, default=128, help="most sequences per iteration")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    g.add_argument("--num-kv-blocks", type=int, default=None,
                   help="cap the KV cache at this many blocks (default: what the worker reports)")
    g.add_argument("--memory-fraction", type=float, default=0.9,
                   help="share of the worker's free memory the KV cache may take")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    g.add_argument("--max-queue", type=int, default=4096, help="requests in flight before RESOURCE_EXHAUSTED")
    g.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="wait for each step's result before scheduling the next (default: overlap)")
    g.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")


def run_scheduler(args: argparse.Namespace, worker_address: str, on_started=None) -> None:
    from sarathi.model_spec import resolve
    from scheduler_service.block_manager import CacheConfig
    from scheduler_service.policies import PolicyConfig
    from scheduler_service.server import serve_frontend
    from scheduler_service.tokenizer import load_tokenizer

    source = resolve(args.model)
    tokenizer = load_tokenizer(source, args.tokenizer)
    engine_kwargs = dict(
        worker_address=worker_address, policy=args.policy,
        policy_config=PolicyConfig(token_budget=args.chunk_size,
                                   max_batch_size=min(args.max_batch_size, args.chunk_size),
                                   target_iteration_ms=args.target_iteration_ms,
                                   min_chunk_size=args.min_chunk_size),
        cache=CacheConfig(watermark=args.watermark, prefix_caching=args.prefix_caching,
                            num_host_blocks=args.num_host_kv_blocks),
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        memory_fraction=args.memory_fraction, overlap=args.overlap)
    try:
        asyncio.run(serve_frontend(args.host, args.port, engine_kwargs, tokenizer, source.name,
                                   args.max_queue, args.metrics_port))
    except KeyboardInterrupt:
        pass


WORKER_FLAGS = ("model", "device", "dtype", "attention", "threads", "cpu_cache_gib", "weights_seed",
                "tensor_parallel_size", "pipeline_parallel_size", "hybrid_graph_tokens")


def worker_flags(args: argparse.Namespace) -> list[str]:
    """The worker options of `args` as command-line flags (what a spawned worker inherits)."""
    flags = []
    for flag in WORKER_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            flags += [f"--{flag.replace('_', '-')}", str(value)]
    if args.no_cuda_graphs:
        flags.append("--no-cuda-graphs")
    return flags


def worker_command(args: argparse.Namespace, worker_port: int) -> list[str]:
    """The `sarathi worker` command line that `serve` starts; a replica's rank 0 starts its
    other ranks itself (local_peer_commands)."""
    cmd = [sys.executable, "-m", "sarathi.cli", "worker", "--host", "127.0.0.1", "--port", str(worker_port),
           *worker_flags(args)]
    if args.hybrid_graph_tokens is None:  # no graphs for iterations the budget never forms
        cmd += ["--hybrid-graph-tokens", str(min(args.chunk_size, HYBRID_GRAPH_TOKENS))]
    return cmd


def exit_with_failed_peer(peers: list[subprocess.Popen]) -> None:
    """Ends rank 0 as soon as one of the local ranks it started exits with an error: rank 0
    would otherwise wait for that rank (at start, for many minutes) before it failed."""
    while True:
        for rank, peer in enumerate(peers, start=1):
            code = peer.poll()
            if code not in (None, 0):
                print(f"worker: rank {rank} exited with code {code}, so the replica cannot run "
                      "(its error is above)", file=sys.stderr, flush=True)
                os._exit(1)
        time.sleep(0.2)


def local_peer_commands(args: argparse.Namespace) -> list[list[str]]:
    """A replica's rank 0 started with no --replica-addresses runs the whole replica on this
    host: this fills in loopback addresses and returns the commands of ranks 1..world-1."""
    world = args.tensor_parallel_size * args.pipeline_parallel_size
    args.replica_addresses = ",".join(f"127.0.0.1:{free_port()}" for _ in range(world))
    args.dist_init = f"127.0.0.1:{free_port()}"
    base = [sys.executable, "-m", "sarathi.cli", "worker", "--host", "127.0.0.1", *worker_flags(args),
            "--replica-addresses", args.replica_addresses, "--dist-init", args.dist_init]
    return [[*base, "--rank", str(rank)] for rank in range(1, world)]


def run_serve(args: argparse.Namespace) -> None:
    """A scheduler (this process + its engine process) and one worker subprocess."""
    from sarathi.lifecycle import dies_with_this_process

    worker_port = args.worker_port or free_port()
    # One worker process; a replica's rank 0 starts its other ranks (they die with it).
    worker = subprocess.Popen(worker_command(args, worker_port), preexec_fn=dies_with_this_process())

    def stop_worker() -> None:
        if worker.poll() is None:
            worker.terminate()
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            worker.kill()

    def on_term(*_):
        stop_worker()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    try:
        run_scheduler(args, f"127.0.0.1:{worker_port}")
    finally:
        stop_worker()


# --- clients --------------------------------------------------------------------------------
def generate(address: str, prompt: str, chat: bool, max_tokens: int, temperature: float,
             seed: int | None, stop: list[str], out=sys.stdout) -> tuple[float | None, object]:
    """Streams one answer to `out`; returns (seconds to first token, the Finished message)."""
    import grpc

    from protos import generation_pb2, generation_pb2_grpc

    params = generation_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=stop)
    if seed is not None:
        params.seed = seed
    req = generation_pb2.GenerateRequest(sampling=params)
    if chat:
        req.chat.messages.add(role="user", content=prompt)
    else:
        req.text = prompt
    start = time.monotonic()
    first = None
    finished = None
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for msg in stub.Generate(req):
            if msg.HasField("chunk"):
                if first is None:
                    first = time.monotonic() - start
                out.write(msg.chunk.text)
                out.flush()
            else:
                finished = msg.finished
                out.write(finished.text + "\n")
    return first, finished


def wait_serving(address: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"the server exited with code {proc.returncode} before serving")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"the server at {address} was not SERVING within {timeout:.0f} s")


def run_generate(args: argparse.Namespace) -> None:
    from protos import generation_pb2

    _, finished = generate(args.address, args.prompt, args.chat, args.max_tokens, args.temperature,
                           args.seed, args.stop)
    if finished is not None:
        reason = generation_pb2.FinishReason.Name(finished.reason).removeprefix("FINISH_REASON_").lower()
        print(f"[{reason}; {finished.usage.prompt_tokens} prompt + "
              f"{finished.usage.completion_tokens} completion tokens]", file=sys.stderr)


def run_demo(args: argparse.Namespace) -> None:
    """Starts `serve` in the background, asks one chat question, prints timings, stops."""
    port = free_port()
    start = time.monotonic()
    cmd = [sys.executable, "-m", "sarathi.cli", "serve", "--port", str(port)]
    if args.model:
        cmd += ["--model", args.model]
    server = subprocess.Popen(cmd, start_new_session=True)
    try:
        address = f"127.0.0.1:{port}"
        print(f"starting a scheduler and a worker (gRPC on {address}) ...", file=sys.stderr, flush=True)
        wait_serving(address, timeout=900, proc=server)
        ready = time.monotonic() - start
        print(f"> {args.prompt}", flush=True)
        first, _ = generate(address, args.prompt, True, args.max_tokens, 0.0, None, [])
        if first is not None:
            print(f"[serving after {ready:.1f} s; first token {first * 1000:.0f} ms after the request; "
                  f"{ready + first:.1f} s from start]", file=sys.stderr)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("bench", "capacity"):
        from benchmarks.serving import cli as bench_cli

        return (bench_cli.main_bench if argv[0] == "bench" else bench_cli.main_capacity)(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        run_worker(args)
    elif args.command == "scheduler":
        run_scheduler(args, args.worker)
    elif args.command == "serve":
        run_serve(args)
    elif args.command == "generate":
        run_generate(args)
    elif args.command == "demo":
        run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sarathi", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="scheduler + worker on this machine (the usual way to run)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--worker-port", type=int, default=None)
    add_worker_args(p)
    add_scheduler_args(p)

    p = sub.add_parser("worker", help="a worker service (model shard + KV cache)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50061)
    add_worker_args(p)

    p = sub.add_parser("scheduler", help="the scheduler service, driving a running worker")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--worker", required=True, help="the worker's host:port")
    p.add_argument("--model", default=None, help="the model the worker serves (for the tokenizer)")
    add_scheduler_args(p)

    for name, helptext in (("generate", "stream one answer from a running server"),
                           ("demo", "start a server, stream one chat answer, stop")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("prompt")
        p.add_argument("--max-tokens", type=int, default=64)
        if name == "generate":
            p.add_argument("--address", default="127.0.0.1:50051")
            p.add_argument("--chat", action="store_true", help="apply the model's chat template")
            p.add_argument("--temperature", type=float, default=0.0)
            p.add_argument("--seed", type=int, default=None)
            p.add_argument("--stop", action="append", default=[])
        else:
            p.add_argument("--model", default=None)
    p = sub.add_parser("bench", help="serving benchmark against a server (see `sarathi bench -h`)")
    p = sub.add_parser("capacity", help="capacity search per policy (see `sarathi capacity -h`)")
    return parser


if __name__ == "__main__":
    main()
