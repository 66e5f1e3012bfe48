"""`sarathi serve` starts its worker with the scheduler's budget in mind: hybrid-iteration CUDA
graphs up to the chunk size (at most 512, the size measured on an H100), or what the user said."""

from __future__ import annotations

from sarathi.cli import build_parser, worker_command


def flag_values(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == flag]


def command_for(*serve_args: str) -> list[str]:
    return worker_command(build_parser().parse_args(["serve", *serve_args]), 50061)


def test_hybrid_graphs_default_to_512_tokens():
    assert flag_values(command_for(), "--hybrid-graph-tokens") == ["512"]


def test_hybrid_graphs_never_exceed_the_chunk_size():
    assert flag_values(command_for("--chunk-size", "256"), "--hybrid-graph-tokens") == ["256"]


def test_hybrid_graphs_stay_at_512_for_larger_budgets():
    assert flag_values(command_for("--chunk-size", "2048"), "--hybrid-graph-tokens") == ["512"]


def test_an_explicit_hybrid_graph_size_is_passed_once_as_given():
    cmd = command_for("--chunk-size", "2048", "--hybrid-graph-tokens", "0")
    assert flag_values(cmd, "--hybrid-graph-tokens") == ["0"]


def test_worker_flags_pass_through():
    cmd = command_for("--model", "dummy:tiny", "--device", "cpu", "--no-cuda-graphs")
    assert flag_values(cmd, "--model") == ["dummy:tiny"]
    assert flag_values(cmd, "--device") == ["cpu"]
    assert "--no-cuda-graphs" in cmd and flag_values(cmd, "--port") == ["50061"]
