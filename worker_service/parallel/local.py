"""A replica's rank 0 started without a layout runs the whole replica on this host: it fills in
loopback addresses and starts ranks 1..n as its children, which die with it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time

from sarathi_common.lifecycle import dies_with_this_process
from sarathi_common.net import free_port
from sarathi_common.options import to_flags, without_option_variables
from worker_service.config import WorkerConfig


def with_local_layout(config: WorkerConfig) -> WorkerConfig:
    """`config` with a loopback mailbox per rank and a loopback rendezvous."""
    return dataclasses.replace(
        config, replica_addresses=",".join(f"127.0.0.1:{free_port()}" for _ in range(config.world_size)),
        dist_init=f"127.0.0.1:{free_port()}")


def peer_commands(config: WorkerConfig) -> list[list[str]]:
    """The commands of ranks 1..world-1 of `config`'s layout (they serve no gRPC: no address)."""
    flags = (*WorkerConfig.SHARED, "replica_addresses", "dist_init", "rank")
    return [[sys.executable, "-m", "worker_service", *to_flags(dataclasses.replace(config, rank=rank), flags)]
            for rank in range(1, config.world_size)]


def start_local_ranks(config: WorkerConfig) -> WorkerConfig:
    """Starts ranks 1..n on this host; returns rank 0's config with the layout they share."""
    config = with_local_layout(config)
    env = without_option_variables(os.environ, WorkerConfig)   # their settings come as flags
    peers = [subprocess.Popen(cmd, env=env, preexec_fn=dies_with_this_process())
             for cmd in peer_commands(config)]
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
