"""The OpenAI-compatible gateway, called with the official `openai` package, in front of a real
server: the same greedy text and usage as the gRPC API, OpenAI-style errors, the API key, and a
disconnected stream that frees its request at once."""

from __future__ import annotations

import http.client
import json
import time
import urllib.request

import pytest
from conftest import start_gateway, wait_for

from protos import generation_pb2 as pb
from sarathi.client import Client

openai = pytest.importorskip("openai")

KEY = "test-key-123"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gateway(default_server):
    gw = start_gateway(default_server.address, api_key=KEY)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def sdk(gateway):
    return openai.OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0, timeout=60)


def test_completions_give_the_grpc_api_s_text_and_usage(default_server, sdk):
    with Client(default_server.address) as client:
        want = client.complete("The capital of France is", max_tokens=10, temperature=0.0, ignore_eos=True)
    got = sdk.completions.create(model="any", prompt="The capital of France is", max_tokens=10, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert got.object == "text_completion" and got.model == "SmolLM2-135M-Instruct"
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == \
        (want.usage.prompt_tokens, want.usage.completion_tokens, want.usage.total_tokens)

    chunks = list(sdk.completions.create(model="any", prompt="The capital of France is", max_tokens=10,
                                         temperature=0, stream=True, stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == want.usage.prompt_tokens


def test_chat_completions_give_the_grpc_api_s_text_and_usage(default_server, sdk):
    with Client(default_server.address) as client:
        want = client.complete(messages=QUESTION, max_tokens=16, temperature=0.0)
    got = sdk.chat.completions.create(model="any", messages=QUESTION, max_tokens=16, temperature=0)
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason  # "stop" or "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == \
        (want.usage.prompt_tokens, want.usage.completion_tokens)

    stream = sdk.chat.completions.create(model="any", messages=QUESTION, max_tokens=16, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-2].choices[0].finish_reason == want.finish_reason
    assert chunks[-1].usage.completion_tokens == want.usage.completion_tokens
    # Without include_usage (the API's default) every chunk has a choice, as OpenAI's do.
    plain = list(sdk.chat.completions.create(model="any", messages=QUESTION, max_tokens=4, temperature=0,
                                             stream=True))
    assert all(c.choices for c in plain)


@pytest.mark.parametrize("body, words, param", [
    ({"temperature": -1}, "temperature", None),       # found by the scheduler: INVALID_ARGUMENT
    ({"n": 2}, "n=1", "n"),                             # found by the gateway
    ({"logprobs": True}, "logprobs", "logprobs"),
    ({"max_tokens": "many"}, "max_tokens", "max_tokens"),
])
def test_bad_requests_get_400_with_an_openai_error_body(sdk, body, words, param):
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model="any", messages=QUESTION, **{"max_tokens": 4, **body})
    assert err.value.status_code == 400
    error = err.value.body
    assert error["type"] == "invalid_request_error" and words in error["message"]
    assert error["param"] == param


def test_a_wrong_or_missing_key_gets_401(gateway):
    for key in ("wrong", ""):
        client = openai.OpenAI(base_url=gateway.base_url, api_key=key or "x", max_retries=0,
                               default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as err:
            client.models.list()
        assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"


def test_models_and_health(gateway, sdk):
    models = sdk.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/health", timeout=10) as r:  # no key needed
        assert json.loads(r.read()) == {"status": "ok", "upstream": "SERVING"}


def test_disconnecting_a_stream_frees_its_blocks_within_an_iteration(default_server, gateway, long_token_ids):
    """A second request keeps the engine stepping, so each iteration shows which requests run."""
    with Client(default_server.address) as client:
        keep = client.generate(long_token_ids[:40], max_tokens=300, ignore_eos=True, temperature=0.0)
        next(keep)
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({
            "prompt": long_token_ids[100:400], "max_tokens": 1000, "ignore_eos": True, "temperature": 0,
            "stream": True}), {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        response = conn.getresponse()
        assert response.status == 200
        for _ in range(3):  # three tokens streamed: its prompt is in the cache
            assert response.readline().startswith(b"data: ")
            assert response.readline() == b"\n"
        doomed = {max(_running_ids(default_server))}  # the later request has the larger id
        used = default_server.metrics()["sarathi_kv_blocks_used"]
        assert used >= 19 + 3  # 300 prompt tokens alone fill 19 blocks of 16
        gone = time.monotonic()
        conn.sock.close()
        conn.close()
        # The survivor holds at most ceil((40 + 300) / 16) = 22 blocks, less early on.
        assert wait_for(lambda: default_server.metrics()["sarathi_kv_blocks_used"] < used - 15, timeout=10)
        freed_after = time.monotonic() - gone
        later = [it for it in _trace(default_server) if it.start_s > gone]
        still = [it for it in later if doomed & set(it.decode_seq_ids)]
        print(f"blocks freed {freed_after * 1000:.0f} ms after the disconnect; the request ran in "
              f"{len(still)} of the {len(later)} iterations that started after it")
        assert len(still) <= 2  # the iteration already planned (two with overlapped scheduling)
        keep.close()


def _trace(server) -> list:
    return list(server.operator().GetTrace(pb.GetTraceRequest(limit=200)).iterations)


def _running_ids(server) -> set[int]:
    last = _trace(server)[-3:]
    return {i for it in last for i in it.decode_seq_ids}
