"""The Python client library against a real server: results as the raw stubs give them, enums as
names, typed errors, deadlines that free the request, retries that wait for a late scheduler."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
from conftest import ROOT, collect

from protos import generation_pb2 as pb
from sarathi.client import (
    NO_RETRY,
    AsyncClient,
    Client,
    DeadlineExceeded,
    InvalidArgument,
    Retry,
    SarathiError,
    Unavailable,
)
from sarathi_common.lifecycle import popen_tied
from sarathi_common.net import free_port

PROMPT = "The capital of France is"


def test_complete_and_generate_give_what_the_stubs_give(default_server):
    tokens, text, finished = collect(default_server.stub().Generate(pb.GenerateRequest(
        text=PROMPT, sampling=pb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))))
    with Client(default_server.address) as client:
        answer = client.complete(PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True)
        deltas = list(client.generate(PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True))
    assert answer.text == text and list(answer.token_ids) == tokens
    assert answer.finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == \
        (finished.usage.prompt_tokens, finished.usage.completion_tokens)
    assert answer.time_to_first_token_s is not None and answer.time_to_first_token_s > 0
    # One delta per token, then the final one with the reason and usage and no token ids.
    assert [d.token_ids for d in deltas[:-1]] == [(t,) for t in tokens]
    assert deltas[-1].finish_reason == "length" and deltas[-1].usage == answer.usage
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_async_client_streams_chat_and_stops_on_a_stop_string(default_server):
    messages = [{"role": "user", "content": "What is the capital of France?"}]

    async def main():
        async with AsyncClient(default_server.address) as client:
            whole = await client.complete(messages=messages, max_tokens=12, temperature=0.0)
            texts = [d.text async for d in client.generate(messages=messages, max_tokens=12, temperature=0.0)]
            stopped = await client.complete(messages=messages, max_tokens=12, temperature=0.0, stop="Paris")
            info = await client.model_info()
        return whole, texts, stopped, info

    whole, texts, stopped, info = asyncio.run(main())
    with Client(default_server.address) as client:
        assert client.complete(messages=[("user", "What is the capital of France?")], max_tokens=12,
                               temperature=0.0).text == whole.text
    assert "".join(texts) == whole.text and "Paris" in whole.text
    assert stopped.finish_reason == "stop" and stopped.text == whole.text.split("Paris")[0]
    assert info.model == "SmolLM2-135M-Instruct" and info.max_model_len > 0


def test_errors_are_typed_and_carry_the_status(default_server):
    with Client(default_server.address) as client:
        with pytest.raises(InvalidArgument) as err:
            client.complete("hi", temperature=-1.0)
    assert err.value.code_name == "INVALID_ARGUMENT" and "temperature" in err.value.details
    start = time.monotonic()
    with Client(f"127.0.0.1:{free_port()}", retry=NO_RETRY) as client, pytest.raises(Unavailable) as err:
        client.complete("hi")
    assert time.monotonic() - start < 5 and isinstance(err.value, SarathiError)


def test_a_deadline_shorter_than_the_generation_raises_and_frees_the_blocks(default_server):
    with Client(default_server.address) as client:
        stream = client.generate(PROMPT, max_tokens=2000, ignore_eos=True, temperature=0.0, timeout=1.5)
        start = time.monotonic()
        received = 0
        with pytest.raises(DeadlineExceeded) as err:
            for delta in stream:
                received += len(delta.token_ids)
        elapsed = time.monotonic() - start
        assert err.value.code_name == "DEADLINE_EXCEEDED"
        assert received > 0 and 1.4 < elapsed < 5
        # The gauge moves with iterations: after one more request, nothing may be left in use.
        assert client.complete("Hello", max_tokens=2).usage.completion_tokens >= 1
    assert default_server.metrics()["sarathi_kv_blocks_used"] == 0


def test_retry_gets_a_request_through_a_scheduler_that_comes_up_late():
    """The scheduler starts 3 s after the call; the call retries UNAVAILABLE (nobody listening,
    then a worker still loading) until it is served."""
    port = free_port()
    serve = [sys.executable, "-m", "sarathi.cli", "serve", "--port", str(port), "--threads", "2",
             "--cpu-cache-gib", "0.25"]
    # Started from this thread (the child dies with the thread that started it), 3 s late.
    late = popen_tied(["sh", "-c", 'sleep 3 && exec "$@"', "sh", *serve], cwd=ROOT)
    start = time.monotonic()
    try:
        with Client(f"127.0.0.1:{port}", retry=Retry(attempts=300, initial_backoff=0.2, max_backoff=1.0),
                    timeout=120) as client:
            answer = client.complete(PROMPT, max_tokens=4, temperature=0.0)
        assert answer.usage.completion_tokens >= 1
        assert time.monotonic() - start > 3
    finally:
        late.terminate()
        late.wait(15)


def test_client_and_gateway_load_without_torch():
    """What a service that only calls the API installs: no torch, no transformers."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import sarathi.client, sarathi.console, sarathi.gateway.app, sarathi.gateway.main\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
