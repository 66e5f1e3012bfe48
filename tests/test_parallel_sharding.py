"""The tensor-parallel transform on its own: which heads each rank keeps, and a replica driven
directly (no scheduler) with KV heads replicated over more ranks than there are KV heads."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from benchmarks.replica.launch import local_replica
from benchmarks.step.harness import PlanMaker
from protos import worker_pb2
from sarathi_common.lifecycle import exit_now
from sarathi_common.model_spec import resolve
from sarathi_common.net import free_port
from worker_service.attention import make_backend
from worker_service.models.loader import load_model
from worker_service.parallel.layout import ReplicaLayout, split_layers
from worker_service.parallel.replica import (
    RankPart,
    ReplicaDriver,
    build_rank,
    close_rank,
    follow,
    rank_device,
)
from worker_service.parallel.tensor_parallel import HeadShard, head_shard, shard_weight
from worker_service.runner import ModelRunner

CPU = torch.device("cpu")


def test_heads_split_evenly_and_kv_heads_follow_their_q_heads():
    # SmolLM2: 9 q heads, 3 KV heads over 3 ranks.
    assert [head_shard(9, 3, r, 3) for r in range(3)] == [HeadShard(0, 3, 0, 1), HeadShard(3, 3, 1, 1),
                                                           HeadShard(6, 3, 2, 1)]
    # 4 q heads, 2 KV heads over 4 ranks: each KV head lives on the two ranks of its q heads.
    assert [head_shard(4, 2, r, 4).kv_lo for r in range(4)] == [0, 0, 1, 1]
    with pytest.raises(ValueError):
        head_shard(9, 3, 0, 2)


def test_layers_split_into_contiguous_stages():
    assert split_layers(30, 4) == [range(0, 8), range(8, 16), range(16, 23), range(23, 30)]


def _layout(tp: int, pp: int, hosts: list[str] | None = None) -> ReplicaLayout:
    hosts = hosts or ["127.0.0.1"] * (tp * pp)
    return ReplicaLayout(tp, pp, tuple(f"{h}:{6000 + k}" for k, h in enumerate(hosts)), "127.0.0.1:5999")


def test_ranks_number_their_gpus_per_host():
    layout = _layout(2, 2, ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"])
    assert [layout.local_rank(r) for r in range(4)] == [0, 1, 0, 1]
    assert rank_device(CPU, layout, 3) == CPU
    assert rank_device(torch.device("cuda", 1), layout, 0) == torch.device("cuda", 1)  # as given


def _whole_name(name: str, layers: range, tied: bool) -> str:
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        return f"layers.{int(index) + layers.start}.{rest}"
    return "embed_tokens.weight" if tied and name == "lm_head.weight" else name


def _check_rank_parts(load, tp: int, pp: int) -> None:
    whole = load()
    config = whole.config
    weights = dict(whole.named_parameters())
    layout = _layout(tp, pp)
    kept = 0
    for rank in range(tp * pp):
        part = RankPart(layout, rank, group=object(), outbox=None)  # no collective runs here
        model = load(part=part)
        layers = split_layers(config.num_layers, pp)[layout.stage_of(rank)]
        for name, p in model.named_parameters(remove_duplicate=False):
            source = _whole_name(name, layers, config.tie_word_embeddings)
            expected = shard_weight(source, weights[source], config, layout.tp_rank_of(rank), tp)
            assert torch.equal(p, expected), name
            # Its own storage: no whole tensor stays alive behind a slice.
            assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name
        kept += sum(p.numel() for p in model.parameters())
    # Every weight is somewhere; only norms (and KV heads replicated over ranks) repeat.
    assert kept >= sum(p.numel() for p in whole.parameters())


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2), (4, 1)])
def test_each_rank_loads_only_its_piece_of_the_whole_model(tp, pp):
    _check_rank_parts(_load, tp, pp)


def test_tied_embeddings_of_a_real_checkpoint_reach_the_first_and_last_stages():
    source = resolve(None)  # the embedded SmolLM2: tied embeddings, 9 q / 3 KV heads

    def load(part=None):
        return load_model(source, make_backend("torch", CPU), CPU, torch.float32, part=part)

    _check_rank_parts(load, 3, 2)


def _load(device=CPU, part=None):
    return load_model(resolve("dummy:tiny"), make_backend("torch", device), device, torch.float32,
                      seed=3, part=part)


def _follower(layout: ReplicaLayout, rank: int) -> None:
    torch.set_num_threads(1)
    r = build_rank(layout, rank, _load, CPU, torch.float32)
    r.mailbox.wait_for_peers(120)
    follow(r)
    exit_now(0)   # skip gloo's teardown, which may wait on ranks that are already gone


def _plans() -> list:
    maker = PlanMaker()
    plans = [maker.new_sequences(1, n) for n in (5, 17, 40, 64)]
    plans += [maker.decode(list(range(4))) for _ in range(12)]
    return plans


@pytest.mark.parametrize("tp,pp", [(4, 1), (2, 2)], ids=["tp4-kv-replicated", "tp2xpp2"])
def test_replica_samples_the_tokens_of_one_runner(tp, pp):
    plans = _plans()
    single = ModelRunner(_load(), CPU, torch.float32)
    single.init_cache(64, 16)
    expected = [single.execute(p).token_ids for p in plans]

    world = tp * pp
    layout = ReplicaLayout(tp, pp, tuple(f"127.0.0.1:{free_port()}" for _ in range(world)),
                           f"127.0.0.1:{free_port()}")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_follower, args=(layout, k), daemon=True) for k in range(1, world)]
    for p in procs:
        p.start()
    r = build_rank(layout, 0, _load, CPU, torch.float32)
    try:
        r.mailbox.wait_for_peers(120)
        driver = ReplicaDriver(r)
        driver.init_cache(64, 16)
        driver.reset()
        results = [driver.execute(p.to_proto().SerializeToString()) for p in plans]
        got = [list(worker_pb2.StepResult.FromString(b).token_ids) for b in results]
        assert got == expected
        driver.stop()
        for p in procs:
            p.join(20)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        close_rank(r)


def test_replica_kv_budget_is_asked_of_every_rank():
    # local_replica also fails the test if rank 1 does not stop cleanly afterwards.
    with local_replica(2, 1, "dummy:tiny", CPU, torch.float32, attention="torch") as driver:
        # On the CPU each rank offers its share of available RAM; the answer, in units of the
        # largest rank's bytes per token, is what the tightest rank can hold.
        budget = driver.profile_free_memory(64, 0.5)
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        per_block = driver.bytes_per_block(16)
        assert 0 < budget <= ram * 0.5
        assert budget // per_block > 0
