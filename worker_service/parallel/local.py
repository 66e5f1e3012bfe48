"""A replica's rank 0 started without a layout runs the whole replica on this host: it fills in
loopback addresses and starts ranks 1..n as its children, which die with it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time

from sarathi_common.lifecycle import popen_tied
from sarathi_common.net import free_port
from sarathi_common.options import to_flags, without_option_variables
from worker_service.config import WorkerConfig
from worker_service.parallel.curve import KEY_ENV, CurveKey


def with_local_layout(config: WorkerConfig) -> WorkerConfig:
    """`config` with a loopback mailbox per rank, bound to loopback only, and a loopback
    rendezvous."""
    return dataclasses.replace(
        config, replica_addresses=",".join(f"127.0.0.1:{free_port()}" for _ in range(config.world_size)),
        dist_init=f"127.0.0.1:{free_port()}", replica_bind="127.0.0.1")


def peer_commands(config: WorkerConfig) -> list[list[str]]:
    """The commands of ranks 1..world-1 of `config`'s layout (they serve no gRPC: no address).
    A CURVE key reaches them in the environment (start_local_ranks), never as a flag."""
    flags = (*WorkerConfig.SHARED, "replica_addresses", "dist_init", "rank", "replica_bind",
             "replica_key_file")
    return [[sys.executable, "-m", "worker_service", *to_flags(dataclasses.replace(config, rank=rank), flags)]
            for rank in range(1, config.world_size)]


def start_local_ranks(config: WorkerConfig) -> WorkerConfig:
    """Starts ranks 1..n on this host; returns rank 0's config with the layout they share."""
    config = with_local_layout(config)
    if config.replica_curve and not config.replica_key_file:
        # A fresh key pair for this replica; rank 0 reads it back from its own environment too
        # (curve.rank_key), which drops it there once the ranks have it.
        os.environ[KEY_ENV] = CurveKey.generate().to_env()
    env = without_option_variables(os.environ, WorkerConfig)   # their settings come as flags
    peers = [popen_tied(cmd, env=env) for cmd in peer_commands(config)]
    threading.Thread(target=exit_with_failed_peer, args=(peers,), daemon=True).start()
    return config


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
