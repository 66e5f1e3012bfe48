"""`sarathi`: one command for every role. `serve` runs a whole replica locally; `scheduler` and
`worker` run the two services apart (other hosts too); `router` puts one address in front of many
schedulers; `gateway` puts the OpenAI-compatible HTTP API in front of any of them; `generate`,
`chat` and `demo` are clients.

This module parses and dispatches only: the settings become typed configs (WorkerConfig,
SchedulerConfig) here, once, and each role's module takes it from there."""

from __future__ import annotations

import argparse
import logging
import sys

from router_service.config import RouterConfig
from sarathi_common.options import add_config_file_option, add_options, from_namespace, settle
from scheduler_service.config import SchedulerConfig
from worker_service.config import WorkerConfig

# Where a service listens: for `serve`, the scheduler's address (its worker takes loopback).
_ADDRESS = ("host", "port")
# Internal TLS files: one set of flags under `serve`, shared by the scheduler and its worker.
_INTERNAL_TLS = ("internal_ca_file", "internal_cert_file", "internal_key_file")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("bench", "capacity"):
        from benchmarks.serving import cli as bench_cli

        return (bench_cli.main_bench if argv[0] == "bench" else bench_cli.main_capacity)(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # torch logs cache statistics at INFO when the process exits: noise after serve's last line.
    logging.getLogger("torch").setLevel(logging.WARNING)
    parser = build_parser()
    args = settle(parser.parse_args(argv))   # flags, then $SARATHI_*, then --config's YAML
    if args.command == "serve" and args.replicas < 1:
        parser.error("--replicas must be at least 1")
    if args.command == "worker":
        from worker_service.main import run_worker

        run_worker(from_namespace(WorkerConfig, args))
    elif args.command == "scheduler":
        from scheduler_service.main import run_scheduler

        run_scheduler(from_namespace(SchedulerConfig, args))
    elif args.command == "router":
        from router_service.main import run_router

        run_router(from_namespace(RouterConfig, args))
    elif args.command == "serve":
        from sarathi.supervise import run_serve

        run_serve(*serve_configs(args), http_port=args.http_port, replicas=args.replicas)
    elif args.command == "gateway":
        from sarathi.gateway.config import GatewayConfig
        from sarathi.gateway.main import run_gateway

        run_gateway(from_namespace(GatewayConfig, args))
    elif args.command in ("generate", "chat"):
        from sarathi import console

        connection = from_namespace(console.ConnectionConfig, args)
        sampling = {k: getattr(args, k) for k in _SAMPLING if hasattr(args, k)}
        try:
            if args.command == "generate":
                code = console.run_generate(connection, args.prompt, args.chat, args.system, **sampling)
            else:
                code = console.run_chat(connection, args.system, **sampling)
        except KeyboardInterrupt:
            code = 130
        raise SystemExit(code)
    elif args.command == "demo":
        from sarathi.supervise import run_demo

        run_demo(args.prompt, args.max_tokens, args.model)


def serve_configs(args: argparse.Namespace) -> tuple[SchedulerConfig, WorkerConfig]:
    """`serve`'s two configs: the scheduler listens where asked, its worker on loopback."""
    from sarathi.supervise import serve_worker_config
    from sarathi_common.net import free_port

    scheduler = from_namespace(SchedulerConfig, args)
    worker_port = args.worker_port
    while worker_port is None or worker_port == scheduler.port:  # the API port may not be bound yet
        worker_port = free_port()
    worker = from_namespace(WorkerConfig, args, host="127.0.0.1", port=worker_port,
                            **{name: getattr(scheduler, name) for name in _INTERNAL_TLS})
    return scheduler, serve_worker_config(worker, scheduler, worker.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sarathi", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="scheduler + worker on this machine (the usual way to run)")
    add_options(p, SchedulerConfig, only=_ADDRESS)
    p.add_argument("--worker-port", type=int, default=None)
    p.add_argument("--replicas", type=int, default=1,
                   help="data-parallel replicas, one worker process each (on GPUs, each its own "
                        "device or devices, from CUDA_VISIBLE_DEVICES); one scheduler places requests "
                        "on them by load (default: 1)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API on this port (a `sarathi gateway` "
                        "process; it takes its API key from $SARATHI_API_KEY)")
    add_options(p, WorkerConfig, skip=(*_ADDRESS, "scheduler", "advertise", "drain_seconds", *_INTERNAL_TLS,
                                       "internal_peer_name"))
    add_options(p, SchedulerConfig, skip=(*_ADDRESS, "worker", "model"))
    add_config_file_option(p)

    p = sub.add_parser("worker", help="a worker service (model shard + KV cache)")
    add_options(p, WorkerConfig)
    add_config_file_option(p)

    p = sub.add_parser("scheduler", help="the scheduler service, driving its workers (named or joined)")
    add_options(p, SchedulerConfig)
    add_config_file_option(p)

    p = sub.add_parser("router", help="one address in front of many schedulers (least work, prefix "
                                      "affinity, retries before the first token)")
    add_options(p, RouterConfig)
    add_config_file_option(p)

    from sarathi.console import ConnectionConfig
    from sarathi.gateway.config import GatewayConfig

    p = sub.add_parser("gateway", help="the OpenAI-compatible HTTP API in front of a scheduler or router")
    add_options(p, GatewayConfig)
    add_config_file_option(p)

    p = sub.add_parser("generate", help="stream one answer from a running server")
    p.add_argument("prompt", help="the prompt (sent as is, or as a user message with --chat)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a chat message (the server "
                                                       "applies the model's chat template)")
    p.add_argument("--system", default=None, help="a system message before the prompt (with --chat)")
    _sampling_options(p, max_tokens=64, temperature=0.0)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this text (repeat for several)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    add_options(p.add_argument_group("connection"), ConnectionConfig)

    p = sub.add_parser("chat", help="an interactive conversation with a running server")
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    _sampling_options(p, max_tokens=512, temperature=0.7)
    add_options(p.add_argument_group("connection"), ConnectionConfig)

    p = sub.add_parser("demo", help="start a server, stream one chat answer, stop")
    p.add_argument("prompt", help="the question")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--model", default=None, help="the model to serve (default: the embedded SmolLM2)")
    sub.add_parser("bench", help="serving benchmark against a server (see `sarathi bench -h`)")
    sub.add_parser("capacity", help="capacity search per policy (see `sarathi capacity -h`)")
    return parser


_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")


def _sampling_options(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"tokens to generate at most (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=temperature,
                   help=f"0 picks the most likely token (greedy); higher is more random "
                        f"(default {temperature})")
    g.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling mass in (0, 1] (default 1: off)")
    g.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens (default: all)")
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


if __name__ == "__main__":
    main()
