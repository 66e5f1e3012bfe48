"""The client API's authentication (issue 21): TLS with client certificates from the
deployment's CA (deploy/dev-certs.sh makes them), and a bearer token checked before any work.
One real server with both."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import ROOT, collect, greedy_request, make_dev_certs, wait_http
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import generation_pb2_grpc
from sarathi.client import TLS, Client, Unauthenticated
from sarathi_common.lifecycle import popen_tied
from sarathi_common.net import free_port

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    return make_dev_certs(tmp_path_factory.mktemp("certs"))


def credentials(certs: Path, client: Path | None = None) -> grpc.ChannelCredentials:
    client = certs if client is None else client
    return grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes(), (client / "client.key").read_bytes(),
                                        (client / "client.pem").read_bytes())


HTTP_PORT = free_port()


@pytest.fixture(scope="module")
def secure_server(certs) -> Iterator[str]:
    """`serve` with TLS, client certificates and a token, and its HTTP gateway (HTTP_PORT)."""
    (certs / "token").write_text(TOKEN + "\n")
    port = free_port()
    cmd = [sys.executable, "-m", "sarathi.cli", "serve", "--port", str(port), "--threads", "2",
           "--http-port", str(HTTP_PORT),
           "--cpu-cache-gib", "0.25", "--chunk-size", "64", "--token-file", str(certs / "token"),
           "--tls-cert-file", str(certs / "server.pem"), "--tls-key-file", str(certs / "server.key"),
           "--tls-client-ca-file", str(certs / "ca.pem")]
    proc = popen_tied(cmd, cwd=ROOT, start_new_session=True,
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"127.0.0.1:{port}"
    try:
        with grpc.secure_channel(address, credentials(certs)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 300
            while True:
                assert proc.poll() is None, "the server exited"
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "not SERVING in time"
                time.sleep(0.3)
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        assert TOKEN not in output   # never logged


def generate(address: str, creds, metadata=()) -> list[int]:
    with grpc.secure_channel(address, creds) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        call = stub.Generate(greedy_request([100, 200, 300], 3), metadata=metadata, timeout=30)
        tokens, _, _ = collect(call)
        return tokens


def test_the_right_token_over_tls_generates(secure_server, certs):
    assert len(generate(secure_server, credentials(certs), (("authorization", f"Bearer {TOKEN}"),))) == 3


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),),
                                      (("authorization", TOKEN),), (("authorization", f"Bearer {TOKEN}x"),)],
                         ids=["missing", "wrong", "no Bearer", "longer"])
def test_a_missing_or_wrong_token_is_unauthenticated(secure_server, certs, metadata):
    with pytest.raises(grpc.RpcError) as err:
        generate(secure_server, credentials(certs), metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert TOKEN not in err.value.details()


def test_health_needs_no_token(secure_server, certs):
    with grpc.secure_channel(secure_server, credentials(certs)) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_and_foreign_certificates_cannot_connect(secure_server, certs):
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(secure_server) as channel, pytest.raises(grpc.RpcError) as err:
        collect(generation_pb2_grpc.GenerationStub(channel).Generate(
            greedy_request([100], 1), metadata=metadata, timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    for client in (certs / "other",):   # a client certificate from another CA
        with pytest.raises(grpc.RpcError) as err:
            generate(secure_server, credentials(certs, client), metadata)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # No client certificate at all.
    with pytest.raises(grpc.RpcError) as err:
        generate(secure_server, grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes()), metadata)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def client_tls(certs: Path) -> TLS:
    return TLS(ca_file=str(certs / "ca.pem"), cert_file=str(certs / "client.pem"),
               key_file=str(certs / "client.key"))


def test_the_python_client_sends_its_token(secure_server, certs):
    tls = client_tls(certs)
    with Client(secure_server, token=TOKEN, tls=tls, timeout=30) as client:
        assert client.complete(prompt=[100, 200], max_tokens=2, temperature=0, ignore_eos=True).usage \
            .completion_tokens == 2
    with Client(secure_server, token="nope", tls=tls, timeout=30) as client, pytest.raises(Unauthenticated):
        client.complete(prompt=[100, 200], max_tokens=2)


def test_every_kind_of_call_but_health_needs_the_token(secure_server, certs):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from protos import generation_pb2 as pb

    with grpc.secure_channel(secure_server, credentials(certs)) as channel:
        with pytest.raises(grpc.RpcError) as err:   # unary-unary
            generation_pb2_grpc.GenerationStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:   # stream-stream
            list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = generation_pb2_grpc.GenerationStub(channel).ModelInfo(
            pb.ModelInfoRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
        assert info.vocab_size > 0


def http_completion(token: str | None) -> tuple[int, dict]:
    body = json.dumps({"model": "any", "prompt": "The capital of France is", "max_tokens": 4,
                       "temperature": 0, "ignore_eos": True}).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"http://127.0.0.1:{HTTP_PORT}/v1/completions", body, headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_s_gateway_reaches_an_api_on_tls_and_forwards_the_token(secure_server, certs):
    """The gateway `serve --http-port` starts calls the scheduler through its local socket (no CA
    or client certificate needed); the caller's token still decides."""
    wait_http(f"http://127.0.0.1:{HTTP_PORT}/health", 60)
    status, body = http_completion(TOKEN)
    assert status == 200 and body["usage"]["completion_tokens"] == 4
    with Client(secure_server, token=TOKEN, tls=client_tls(certs), timeout=30) as client:
        want = client.complete("The capital of France is", max_tokens=4, temperature=0.0, ignore_eos=True)
    assert body["choices"][0]["text"] == want.text
    assert http_completion("wrong")[0] == 401
    assert http_completion(None)[0] == 401


def test_the_token_comes_from_the_file_or_the_environment(tmp_path, monkeypatch):
    from sarathi_common.auth import load_token

    monkeypatch.delenv("SARATHI_TOKEN", raising=False)
    assert load_token(None) is None
    monkeypatch.setenv("SARATHI_TOKEN", "from-env")
    assert load_token(None) == "from-env"
    (tmp_path / "t").write_text("  from-file\n")
    assert load_token(str(tmp_path / "t")) == "from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SystemExit):
        load_token(str(tmp_path / "empty"))
