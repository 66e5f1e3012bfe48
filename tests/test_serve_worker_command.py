"""`sarathi serve` starts its worker with the scheduler's budget in mind: hybrid-iteration CUDA
graphs up to the chunk size (at most 2048), or what the user said.
A replica's rank 0 started without a layout starts its other ranks on this host."""

from __future__ import annotations

from sarathi.cli import build_parser, serve_configs
from sarathi.supervise import worker_command
from sarathi_common.options import from_namespace
from worker_service.config import WorkerConfig
from worker_service.parallel.local import peer_commands, with_local_layout


def flag_values(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == flag]


def command_for(*serve_args: str) -> list[str]:
    return worker_command(serve_configs(build_parser().parse_args(["serve", "--worker-port", "50061",
                                                                   *serve_args]))[1])


def test_hybrid_graphs_default_to_512_tokens():
    assert flag_values(command_for(), "--hybrid-graph-tokens") == ["512"]


def test_hybrid_graphs_never_exceed_the_chunk_size():
    assert flag_values(command_for("--chunk-size", "256"), "--hybrid-graph-tokens") == ["256"]


def test_hybrid_graphs_follow_the_budget_up_to_2048_tokens():
    assert flag_values(command_for("--chunk-size", "2048"), "--hybrid-graph-tokens") == ["2048"]
    assert flag_values(command_for("--chunk-size", "8192"), "--hybrid-graph-tokens") == ["2048"]


def test_an_explicit_hybrid_graph_size_is_passed_once_as_given():
    cmd = command_for("--chunk-size", "2048", "--hybrid-graph-tokens", "0")
    assert flag_values(cmd, "--hybrid-graph-tokens") == ["0"]


def test_worker_flags_pass_through():
    cmd = command_for("--model", "dummy:tiny", "--device", "cpu", "--no-cuda-graphs")
    assert flag_values(cmd, "--model") == ["dummy:tiny"]
    assert flag_values(cmd, "--device") == ["cpu"]
    assert "--no-cuda-graphs" in cmd and flag_values(cmd, "--port") == ["50061"]


def test_serve_starts_one_worker_even_for_a_replica():
    cmd = command_for("--tensor-parallel-size", "2", "--pipeline-parallel-size", "2")
    assert flag_values(cmd, "--tensor-parallel-size") == ["2"]
    assert "--replica-addresses" not in cmd and "--rank" not in cmd  # rank 0 starts the others


def test_rank_0_without_a_layout_starts_ranks_1_to_n_with_one_shared_layout():
    args = build_parser().parse_args(["worker", "--model", "dummy:tiny", "--tensor-parallel-size", "2",
                                      "--pipeline-parallel-size", "2"])
    args = with_local_layout(from_namespace(WorkerConfig, args))
    peers = peer_commands(args)
    assert [flag_values(c, "--rank") for c in peers] == [["1"], ["2"], ["3"]]
    addresses = {tuple(flag_values(c, "--replica-addresses")) for c in peers}
    assert addresses == {(args.replica_addresses,)} and len(args.replica_addresses.split(",")) == 4
    assert {tuple(flag_values(c, "--dist-init")) for c in peers} == {(args.dist_init,)}
    assert all(flag_values(c, "--model") == ["dummy:tiny"] for c in peers)


def test_serve_gives_its_worker_the_internal_tls_files_and_curve():
    cmd = command_for("--internal-ca-file", "ca.pem", "--internal-cert-file", "c.pem", "--internal-key-file",
                      "c.key", "--replica-curve")
    assert flag_values(cmd, "--internal-ca-file") == ["ca.pem"]
    assert flag_values(cmd, "--internal-cert-file") == ["c.pem"]
    assert flag_values(cmd, "--internal-key-file") == ["c.key"]
    assert "--replica-curve" in cmd


def test_a_local_replica_binds_its_mailboxes_to_loopback():
    config = with_local_layout(WorkerConfig(tensor_parallel_size=2))
    (peer,) = peer_commands(config)
    assert config.replica_bind == "127.0.0.1"
    assert flag_values(peer, "--replica-bind") == ["127.0.0.1"]
