"""The README's "Calling it from your service" examples, run as written (only the addresses
changed) against one `sarathi serve --http-port`: grpcurl, the Python client, the OpenAI SDK and
Node's grpc-js."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, start_server, wait_http

from sarathi_common.net import free_port

README = (ROOT / "README.md").read_text()


def example(name: str) -> str:
    match = re.search(rf"<!-- test: {name} -->\n```\w+\n(.*?)```", README, re.S)
    assert match, f"the README has no example marked `<!-- test: {name} -->`"
    return match.group(1)


@pytest.fixture(scope="module")
def served():
    http_port = free_port()
    server = start_server("--http-port", str(http_port), "--chunk-size", "64")
    try:
        wait_http(f"http://127.0.0.1:{http_port}/health", 60)
        yield server, f"127.0.0.1:{http_port}"
    finally:
        server.stop()


def here(code: str, served) -> str:
    server, http = served
    return code.replace("127.0.0.1:50051", server.address).replace("127.0.0.1:8000", http)


def test_grpcurl_example(served):
    beside = Path(sys.executable).parent  # the test extra installs it into the environment
    path = f"{beside}{os.pathsep}{os.environ.get('PATH', '')}"
    if shutil.which("grpcurl", path=path) is None:
        pytest.skip("grpcurl is not installed (the test extra brings it on x86-64 Linux)")
    out = subprocess.run(["bash", "-c", here(example("grpcurl"), served)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PATH": path})
    assert out.returncode == 0, out.stderr
    assert '"finished"' in out.stdout and '"chunk"' in out.stdout and '"status": "SERVING"' in out.stdout


def test_python_client_example(served):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(here(example("python"), served), "README:python", "exec"), {})
    text = out.getvalue()
    assert text.count("Paris") >= 2 and re.search(r" (stop|length) \d+\n", text), text
    assert text.endswith("\ngave up: DEADLINE_EXCEEDED\n"), text


def test_openai_sdk_example(served):
    pytest.importorskip("openai")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(here(example("openai"), served), "README:openai", "exec"), {})
    assert "Paris" in out.getvalue() and re.search(r"\n\[\d+ tokens\]\n$", out.getvalue())


def test_node_grpc_js_example(served, tmp_path):
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed")
    from sarathi_common.model_spec import cache_root

    packages = cache_root() / "node-client"  # installed once, reused by later runs
    if not (packages / "node_modules" / "@grpc" / "proto-loader").exists():
        packages.mkdir(parents=True, exist_ok=True)
        install = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(packages),
                                  "@grpc/grpc-js@1", "@grpc/proto-loader@0"],
                                 capture_output=True, text=True, timeout=300)
        assert install.returncode == 0, install.stderr
    script = tmp_path / "generate.js"
    script.write_text(here(example("node"), served).replace(
        '"protos/generation.proto"', repr(str(ROOT / "protos" / "generation.proto")).replace("'", '"')))
    out = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=120,
                         env={"NODE_PATH": str(packages / "node_modules"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and re.search(r"\[FINISH_REASON_(STOP|LENGTH); \d+ tokens\]", out.stdout)
