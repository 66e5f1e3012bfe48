"""Every role takes its settings from flags, then SARATHI_* variables, then the --config YAML
file, then the defaults; bad values end with one line naming the variable or the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from router_service.config import RouterConfig
from sarathi.cli import build_parser, serve_configs
from sarathi.gateway.config import GatewayConfig
from sarathi_common.options import from_namespace, settle
from scheduler_service.config import SchedulerConfig
from worker_service.config import WorkerConfig


def parse(argv: list[str], environ: dict[str, str]):
    return settle(build_parser().parse_args(argv), environ)


def yaml_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sarathi.yaml"
    path.write_text(text)
    return str(path)


# Per role: (argv prefix, how to get the config, the option's field, flag, values for the
# flag, the variable, the file).
ROLES = {
    "scheduler": (["scheduler"], lambda a: from_namespace(SchedulerConfig, a), "chunk_size",
                  "--chunk-size", 64, 128, 256),
    "worker": (["worker"], lambda a: from_namespace(WorkerConfig, a), "port", "--port", 6001, 6002, 6003),
    "serve": (["serve"], lambda a: serve_configs(a)[0], "max_queue", "--max-queue", 11, 12, 13),
    "gateway": (["gateway"], lambda a: from_namespace(GatewayConfig, a), "port", "--port", 8101, 8102,
                8103),
    "router": (["router", "--scheduler", "127.0.0.1:1"], lambda a: from_namespace(RouterConfig, a),
               "drain_seconds", "--drain-seconds", 5.0, 6.0, 7.0),
}


@pytest.mark.parametrize("role", sorted(ROLES))
def test_a_flag_wins_over_the_environment_and_the_file(role, tmp_path):
    argv, build, name, flag, by_flag, by_env, by_file = ROLES[role]
    config = yaml_file(tmp_path, f"{name}: {by_file}\n")
    environ = {f"SARATHI_{name.upper()}": str(by_env)}
    args = parse([*argv, flag, str(by_flag), "--config", config], environ)
    assert getattr(build(args), name) == by_flag


@pytest.mark.parametrize("role", sorted(ROLES))
def test_the_environment_wins_over_the_file(role, tmp_path):
    argv, build, name, _, _, by_env, by_file = ROLES[role]
    config = yaml_file(tmp_path, f"{name.replace('_', '-')}: {by_file}\n")
    args = parse([*argv, "--config", config], {f"SARATHI_{name.upper()}": str(by_env)})
    assert getattr(build(args), name) == by_env


@pytest.mark.parametrize("role", sorted(ROLES))
def test_the_file_wins_over_the_default(role, tmp_path):
    argv, build, name, _, _, _, by_file = ROLES[role]
    config = yaml_file(tmp_path, f"{name}: {by_file}\n")
    assert getattr(build(parse([*argv, "--config", config], {})), name) == by_file
    # named by the environment instead of the flag
    assert getattr(build(parse(argv, {"SARATHI_CONFIG": config})), name) == by_file


@pytest.mark.parametrize("role", sorted(ROLES))
def test_nothing_set_gives_the_default(role):
    argv, build, name, *_ = ROLES[role]
    cls = {"scheduler": SchedulerConfig, "serve": SchedulerConfig, "worker": WorkerConfig,
           "gateway": GatewayConfig, "router": RouterConfig}[role]
    assert getattr(build(parse(argv, {})), name) == cls.__dataclass_fields__[name].default


def test_a_flag_given_with_its_default_value_still_wins_over_the_environment():
    args = parse(["scheduler", "--chunk-size", "512"], {"SARATHI_CHUNK_SIZE": "64"})
    assert from_namespace(SchedulerConfig, args).chunk_size == 512


def test_switches_read_true_and_false_from_the_environment_and_the_file(tmp_path):
    def scheduler(environ):
        return from_namespace(SchedulerConfig, parse(["scheduler"], environ))

    assert scheduler({"SARATHI_OVERLAP": "false"}).overlap is False
    assert scheduler({"SARATHI_PREFIX_CACHING": "1"}).prefix_caching
    config = yaml_file(tmp_path, "prefix-caching: true\noverlap: false\n")
    settings = from_namespace(SchedulerConfig, parse(["scheduler", "--config", config], {}))
    assert settings.prefix_caching and not settings.overlap
    # the flag still wins
    args = parse(["scheduler", "--no-overlap"], {"SARATHI_OVERLAP": "true"})
    assert from_namespace(SchedulerConfig, args).overlap is False


@pytest.mark.parametrize("environ, message", [
    ({"SARATHI_CHUNK_SIZE": "lots"}, "SARATHI_CHUNK_SIZE='lots': expected int"),
    ({"SARATHI_OVERLAP": "maybe"}, "SARATHI_OVERLAP='maybe': expected true or false"),
    ({"SARATHI_POLICY": "fastest"}, "SARATHI_POLICY: 'fastest' is not one of"),
])
def test_a_bad_variable_ends_with_one_line_naming_it(environ, message):
    with pytest.raises(SystemExit) as err:
        parse(["scheduler"], environ)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("chunk-sise: 64\n", "unknown setting chunk_sise"),
    ("chunk-size: [64]\n", "chunk_size in"),
    ("- chunk-size\n", "must hold a mapping"),
    ("chunk-size: : :\n", "is not valid YAML"),
])
def test_a_bad_file_ends_with_one_line_naming_it(tmp_path, text, message):
    config = yaml_file(tmp_path, text)
    with pytest.raises(SystemExit) as err:
        parse(["scheduler", "--config", config], {})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_missing_file_ends_with_one_line():
    with pytest.raises(SystemExit, match="cannot read the config file /nonexistent.yaml"):
        parse(["worker", "--config", "/nonexistent.yaml"], {})


def test_a_file_may_only_set_the_commands_own_options(tmp_path):
    config = yaml_file(tmp_path, "worker: 127.0.0.1:1\n")   # a scheduler option, not a worker's
    with pytest.raises(SystemExit, match="unknown setting worker"):
        parse(["worker", "--config", config], {})


def test_help_names_each_options_variable_and_the_precedence():
    help_text = subprocess.run([sys.executable, "-m", "sarathi.cli", "scheduler", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "[$SARATHI_CHUNK_SIZE]" in help_text and "--config FILE" in help_text
    assert "a flag wins over the variable, which wins over the file" in " ".join(help_text.split())


def test_serves_children_do_not_take_the_variables_meant_for_serve(monkeypatch):
    from sarathi.supervise import child_environment

    monkeypatch.setenv("SARATHI_PORT", "50051")          # the scheduler's port
    monkeypatch.setenv("SARATHI_CONFIG", "/etc/sarathi.yaml")
    monkeypatch.setenv("SARATHI_API_KEY", "k")           # the gateway child's own setting
    env = child_environment()
    assert "SARATHI_PORT" not in env and "SARATHI_CONFIG" not in env
    assert env["SARATHI_API_KEY"] == "k"


def test_a_scheduler_process_listens_where_the_environment_says_over_its_file(tmp_path):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from sarathi_common.net import free_port

    by_file, by_env = free_port(), free_port()
    config = yaml_file(tmp_path, f"port: {by_file}\nhost: 127.0.0.1\nmax-queue: 3\n")
    proc = subprocess.Popen([sys.executable, "-m", "sarathi.cli", "scheduler", "--config", config],
                            env={**os.environ, "SARATHI_PORT": str(by_env)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{by_env}") as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING   # no worker yet
    finally:
        proc.terminate()
        proc.wait(30)
