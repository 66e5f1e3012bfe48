"""The gateway's HTTP status for each gRPC status, its error event in a broken stream, and the
caller's Authorization header forwarded as gRPC metadata. The upstream is a small real gRPC server
in this process that answers each prompt with the status it names (the scheduler cannot be made
to return every status on demand, and it does not check tokens yet)."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import threading
import time
from concurrent import futures

import grpc
import pytest
from conftest import start_gateway
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import generation_pb2 as pb
from protos import generation_pb2_grpc
from sarathi.client import NO_RETRY, TLS, Client, ResourceExhausted, Unauthenticated, Unavailable
from sarathi.gateway.protocol import Responder
from sarathi_common.net import free_port

openai = pytest.importorskip("openai")


class StandIn(generation_pb2_grpc.GenerationServicer):
    def __init__(self):
        self.metadata: list[dict[str, str]] = []
        self.cancelled = threading.Event()

    def Generate(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        text = request.text or request.chat.messages[-1].content
        if text == "hang":  # no token until the call is cancelled
            context.add_callback(self.cancelled.set)
            while context.is_active():
                time.sleep(0.01)
            return
        if text.startswith("status:"):
            context.abort(getattr(grpc.StatusCode, text.removeprefix("status:")), f"the upstream says {text}")
        yield pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=[7], text="Hi"))
        if text == "break":
            context.abort(grpc.StatusCode.UNAVAILABLE, "the worker is gone")
        reason = pb.FINISH_REASON_ABORT if text == "abort" else pb.FINISH_REASON_STOP
        yield pb.GenerateResponse(finished=pb.Finished(reason=reason, usage=pb.Usage(prompt_tokens=3,
                                                                                     completion_tokens=1)))

    def ModelInfo(self, request, context):
        return pb.ModelInfoResponse(model="stand-in", max_model_len=64)


def stand_in(credentials: grpc.ServerCredentials | None = None):
    servicer = StandIn()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = free_port()
    if credentials is None:
        server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()
    return server, f"127.0.0.1:{port}", servicer


@pytest.fixture(scope="module")
def upstream():
    server, address, servicer = stand_in()
    yield address, servicer
    server.stop(0)


@pytest.fixture(scope="module")
def sdk(upstream):
    gateway = start_gateway(upstream[0])  # no key of its own: every caller is let in, header forwarded
    yield openai.OpenAI(base_url=gateway.base_url, api_key="caller-token", max_retries=0, timeout=30)
    gateway.stop()


@pytest.mark.parametrize("code, http", [
    ("INVALID_ARGUMENT", 400), ("UNAUTHENTICATED", 401), ("PERMISSION_DENIED", 403),
    ("RESOURCE_EXHAUSTED", 429), ("UNAVAILABLE", 503), ("DEADLINE_EXCEEDED", 504), ("INTERNAL", 500),
])
def test_each_grpc_status_gets_its_http_status(sdk, code, http):
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as err:
            sdk.completions.create(model="m", prompt=f"status:{code}", stream=stream)
        assert err.value.status_code == http
        assert err.value.body["code"] == code.lower() and code in err.value.body["message"]


def test_the_callers_token_is_forwarded_as_metadata(sdk, upstream):
    sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}])
    assert upstream[1].metadata[-1]["authorization"] == "Bearer caller-token"


def test_a_stream_that_breaks_ends_with_an_error_event(sdk):
    stream = sdk.completions.create(model="m", prompt="break", stream=True)
    assert next(iter(stream)).choices[0].text == "Hi"
    with pytest.raises(openai.APIError, match="the worker is gone"):
        list(stream)
    with pytest.raises(openai.APIStatusError) as err:  # an aborted request is a 503, not an answer
        sdk.completions.create(model="m", prompt="abort")
    assert err.value.status_code == 503


@pytest.mark.parametrize("stream", [False, True])
def test_a_caller_that_leaves_before_the_first_token_cancels_the_upstream_call(sdk, upstream, stream):
    servicer = upstream[1]
    servicer.cancelled.clear()
    port = int(str(sdk.base_url).split(":")[2].split("/")[0])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "hang", "stream": stream}),
                 {"Content-Type": "application/json"})
    time.sleep(0.5)  # the gateway is waiting for the first token
    assert not servicer.cancelled.is_set()
    left = time.monotonic()
    conn.sock.close()
    assert servicer.cancelled.wait(5)
    print(f"upstream call cancelled {(time.monotonic() - left) * 1000:.0f} ms after the caller left")


def test_the_client_library_types_the_same_statuses(upstream):
    with Client(upstream[0], token="t0k") as client:
        with pytest.raises(ResourceExhausted):
            client.complete("status:RESOURCE_EXHAUSTED")
        with pytest.raises(Unauthenticated) as err:
            client.complete("status:UNAUTHENTICATED")
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert client.complete("x").finish_reason == "stop"
    assert upstream[1].metadata[-1]["authorization"] == "Bearer t0k"


@pytest.mark.parametrize("chat", [False, True])
def test_a_token_s_prebuilt_event_is_the_chunk_it_stands_for(chat):
    responder = Responder(chat, 'a "model"')
    for text in ("Hi", ' "quoted" \\ back', "\n", "日本語 🙂", "</script>"):
        event_bytes = responder.token_event(text)
        assert event_bytes.startswith(b"data: ") and event_bytes.endswith(b"\n\n")
        assert json.loads(event_bytes[6:]) == responder.chunk(text)


def test_tls_upstream_for_the_client_and_the_gateway(tmp_path):
    """A self-signed certificate for 127.0.0.1: the client and the gateway trust it by --upstream-ca;
    without it the connection fails."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=sarathi", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server, address, _ = stand_in(grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    try:
        with Client(address, tls=TLS(ca_file=str(cert)), retry=NO_RETRY) as client:
            assert client.complete("x").text == "Hi"
        with Client(address, tls=True, retry=NO_RETRY) as client, pytest.raises(Unavailable):
            client.complete("x")  # the system's roots do not know this certificate
        gateway = start_gateway(address, "--upstream-ca", str(cert))
        try:
            sdk = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0, timeout=30)
            assert sdk.completions.create(model="m", prompt="x").choices[0].text == "Hi"
        finally:
            gateway.stop()
    finally:
        server.stop(0)
