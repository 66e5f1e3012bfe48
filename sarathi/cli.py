"""`sarathi`: one command for every role. `serve` runs a whole replica locally; `scheduler` and
`worker` run the two services apart (other hosts too); `generate` and `demo` are clients.

This module parses and dispatches only: the settings become typed configs (WorkerConfig,
SchedulerConfig) here, once, and each role's module takes it from there."""

from __future__ import annotations

import argparse
import logging
import sys

from sarathi_common.options import add_options, from_namespace
from scheduler_service.config import SchedulerConfig
from worker_service.config import WorkerConfig

# Where a service listens: for `serve`, the scheduler's address (its worker takes loopback).
_ADDRESS = ("host", "port")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("bench", "capacity"):
        from benchmarks.serving import cli as bench_cli

        return (bench_cli.main_bench if argv[0] == "bench" else bench_cli.main_capacity)(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "worker":
        from worker_service.main import run_worker

        run_worker(from_namespace(WorkerConfig, args))
    elif args.command == "scheduler":
        from scheduler_service.main import run_scheduler

        run_scheduler(from_namespace(SchedulerConfig, args))
    elif args.command == "serve":
        from sarathi.supervise import run_serve

        run_serve(*serve_configs(args))
    elif args.command == "generate":
        from sarathi.client import finish_line, generate

        _, finished = generate(args.address, args.prompt, args.chat, args.max_tokens, args.temperature,
                               args.seed, args.stop)
        if finished is not None:
            print(finish_line(finished), file=sys.stderr)
    elif args.command == "demo":
        from sarathi.supervise import run_demo

        run_demo(args.prompt, args.max_tokens, args.model)


def serve_configs(args: argparse.Namespace) -> tuple[SchedulerConfig, WorkerConfig]:
    """`serve`'s two configs: the scheduler listens where asked, its worker on loopback."""
    from sarathi.supervise import serve_worker_config
    from sarathi_common.net import free_port

    scheduler = from_namespace(SchedulerConfig, args)
    worker = from_namespace(WorkerConfig, args, host="127.0.0.1", port=args.worker_port or free_port())
    return scheduler, serve_worker_config(worker, scheduler, worker.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sarathi", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="scheduler + worker on this machine (the usual way to run)")
    add_options(p, SchedulerConfig, only=_ADDRESS)
    p.add_argument("--worker-port", type=int, default=None)
    add_options(p, WorkerConfig, skip=_ADDRESS)
    add_options(p, SchedulerConfig, skip=(*_ADDRESS, "worker", "model"))

    p = sub.add_parser("worker", help="a worker service (model shard + KV cache)")
    add_options(p, WorkerConfig)

    p = sub.add_parser("scheduler", help="the scheduler service, driving its workers (named or joined)")
    add_options(p, SchedulerConfig)

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
    sub.add_parser("bench", help="serving benchmark against a server (see `sarathi bench -h`)")
    sub.add_parser("capacity", help="capacity search per policy (see `sarathi capacity -h`)")
    return parser


if __name__ == "__main__":
    main()
