"""A replica's worker process (`sarathi worker` with TP or PP above 1): rank 0 serves the Worker
gRPC service (server.py) with a ReplicaDriver as its executor; every other rank follows rank 0's
control messages and serves nothing."""

from __future__ import annotations

import logging
import signal
import time

import torch

from sarathi_common.lifecycle import exit_now
from worker_service import memory
from worker_service.config import WorkerConfig
from worker_service.parallel.curve import LinkSecurity, rank_key
from worker_service.parallel.layout import ReplicaLayout
from worker_service.parallel.replica import ReplicaDriver, build_rank, follow
from worker_service.server import serve_worker

log = logging.getLogger("sarathi.replica")


def layout_of(config: WorkerConfig) -> ReplicaLayout:
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    if config.replica_addresses is None or config.dist_init is None:
        raise SystemExit(f"a replica of TP={tp} x PP={pp} spread over hosts needs --replica-addresses "
                         "(one host:port per rank) and --dist-init host:port on every rank; "
                         "rank 0 given neither runs the whole replica on this host")
    return ReplicaLayout.parse(tp, pp, config.replica_addresses, config.dist_init)


def run_replica_worker(config: WorkerConfig, load, device: torch.device, dtype: torch.dtype) -> None:
    """`sarathi worker` with --tensor-parallel-size or --pipeline-parallel-size above 1."""
    layout = layout_of(config)
    rank = config.rank
    start = time.monotonic()
    security = LinkSecurity(rank_key(config.replica_curve, config.replica_key_file), config.replica_bind)
    r = build_rank(layout, rank, load, device, dtype, cuda_graphs=config.cuda_graphs, security=security)
    weight_bytes = memory.weight_bytes(r.runner.model)
    where = f"rank {rank} (stage {layout.stage_of(rank)}, TP rank {layout.tp_rank_of(rank)}) " \
            f"of TP={layout.tp_size} x PP={layout.pp_size}"
    print(f"worker {where}: {weight_bytes / 1e6:.0f} MB of weights in this shard, built in "
          f"{time.monotonic() - start:.1f} s{'; ZeroMQ links under CURVE' if security.key else ''}",
          flush=True)
    if rank != 0:
        signal.signal(signal.SIGTERM, lambda *_: exit_now(0))
        r.mailbox.wait_for_peers(timeout=900)
        try:
            follow(r)
        except BaseException:  # noqa: BLE001 - a broken collective or handoff: the replica is done
            log.exception("rank %d failed", rank)
            exit_now(5)        # not a normal exit: gloo's teardown could wait on dead peers
        exit_now(0)
    r.mailbox.wait_for_peers(timeout=900)
    # Weights of the whole replica: ranks of one stage hold equal shards, stages about equal.
    serve_worker(ReplicaDriver(r), config, weight_bytes * layout.world_size, name=f"worker {where}")
    exit_now(0)
