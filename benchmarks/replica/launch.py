"""A replica's ranks as processes on this host, for the benchmarks and tests that drive rank 0
directly (no scheduler, no gRPC): rank 0 lives in the calling process, the others follow it."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from sarathi_common.lifecycle import exit_now
from sarathi_common.model_spec import resolve
from sarathi_common.net import free_port
from worker_service.attention import make_backend
from worker_service.models.loader import load_model
from worker_service.parallel.layout import ReplicaLayout
from worker_service.parallel.replica import ReplicaDriver, build_rank, close_rank, follow


def loader(model: str, dtype: torch.dtype, attention: str = "auto"):
    """load(device, part) for build_rank: `model` as `sarathi worker --model` takes it."""
    source = resolve(model)

    def load(device: torch.device, part=None):
        return load_model(source, make_backend(attention, device), device, dtype, seed=0, part=part)
    return load


def _follower(layout: ReplicaLayout, rank: int, model: str, device: torch.device, dtype: torch.dtype,
              attention: str) -> None:
    torch.set_num_threads(1)
    r = build_rank(layout, rank, loader(model, dtype, attention), device, dtype)
    r.mailbox.wait_for_peers(900)
    follow(r)
    # Rank 0 lives on (it may build another replica), so it must destroy its process group, and
    # NCCL's teardown waits for every rank of the host: leave it together with rank 0.
    close_rank(r)
    exit_now(0)


@contextmanager
def local_replica(tp: int, pp: int, model: str, device: torch.device, dtype: torch.dtype,
                  attention: str = "auto") -> Iterator[ReplicaDriver]:
    """TP x PP ranks on this host (one GPU each where `device` is cuda); yields rank 0's driver
    and stops every rank on the way out. After a normal exit of the block, a rank that did not
    stop cleanly (exit code 0 within 10 s) is an error."""
    world = tp * pp
    layout = ReplicaLayout(tp, pp, tuple(f"127.0.0.1:{free_port()}" for _ in range(world)),
                           f"127.0.0.1:{free_port()}")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_follower, args=(layout, k, model, device, dtype, attention), daemon=True)
             for k in range(1, world)]
    for p in procs:
        p.start()
    torch.set_num_threads(1)
    r = build_rank(layout, 0, loader(model, dtype, attention), device, dtype)
    driver = None
    finished = False
    try:
        r.mailbox.wait_for_peers(900)
        driver = ReplicaDriver(r)
        yield driver
        finished = True
    finally:
        if driver is not None:
            driver.stop()   # every rank leaves follow() and meets the others in close_rank
        if driver is not None and all(p.exitcode in (None, 0) for p in procs):
            close_rank(r)   # with the other ranks: NCCL's teardown waits for all of a host's ranks
        else:               # a rank is gone or never joined: a collective teardown would wait forever
            r.mailbox.close()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    codes = [p.exitcode for p in procs]
    if finished and any(code != 0 for code in codes):
        raise RuntimeError(f"ranks 1..{world - 1} ended with exit codes {codes}")
