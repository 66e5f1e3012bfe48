"""Pipeline parallelism keeps several micro-batches in flight: rank 0 dispatches plan N+1 into
stage 0 while the last stage still runs plan N, unless the two share a sequence."""

from __future__ import annotations

import multiprocessing as mp
import threading

import torch
from test_parallel_sharding import CPU, _follower, _load

from benchmarks.step.harness import PlanMaker
from protos import worker_pb2
from sarathi_common.net import free_port
from worker_service.parallel.layout import ReplicaLayout
from worker_service.parallel.replica import ReplicaDriver, build_rank, close_rank
from worker_service.runner import ModelRunner


def _plans() -> list:
    """Two groups of four sequences, prefilled then decoded in alternating micro-batches, and
    at the end two plans for the same group back to back (these must not overlap)."""
    maker = PlanMaker()
    plans = [maker.new_sequences(4, 24), maker.new_sequences(4, 40)]
    a, b = [0, 1, 2, 3], [4, 5, 6, 7]
    for _ in range(8):
        plans += [maker.decode(a), maker.decode(b)]
    plans += [maker.decode(a), maker.decode(a)]
    return plans


def test_pp2_keeps_two_disjoint_micro_batches_in_flight_with_exact_tokens():
    plans = _plans()
    single = ModelRunner(_load(), CPU, torch.float32)
    single.init_cache(64, 16)
    expected = [single.execute(p).token_ids for p in plans]

    layout = ReplicaLayout(1, 2, (f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"),
                           f"127.0.0.1:{free_port()}")
    proc = mp.get_context("spawn").Process(target=_follower, args=(layout, 1), daemon=True)
    proc.start()
    r = build_rank(layout, 0, _load, CPU, torch.float32)
    try:
        r.mailbox.wait_for_peers(120)
        driver = ReplicaDriver(r)
        driver.init_cache(64, 16)
        driver.reset()
        in_flight_at_dispatch: list[list[int]] = []

        def feed() -> None:
            for p in plans:
                driver.dispatch(p.to_proto().SerializeToString())
                with driver._cond:
                    in_flight_at_dispatch.append([f.step_id for f in driver._in_flight])

        feeder = threading.Thread(target=feed)
        feeder.start()
        got = [list(worker_pb2.StepResult.FromString(driver.collect(p.step_id)).token_ids) for p in plans]
        feeder.join()
        assert got == expected
        assert driver.max_in_flight == 2
        seqs = {p.step_id: set(p.seq_ids) for p in plans}
        for flights in in_flight_at_dispatch:   # no sequence in two micro-batches at once
            assert sum(len(seqs[s]) for s in flights) == len(set().union(*(seqs[s] for s in flights)))
        driver.stop()
        proc.join(20)
    finally:
        if proc.is_alive():
            proc.kill()
        close_rank(r)
