"""The client API over real gRPC: streaming, sampling parameters, stops, errors, cancellation."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from conftest import collect, greedy_request, wait_for

from protos import generation_pb2 as pb


def text_request(text: str, **sampling) -> pb.GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    return pb.GenerateRequest(text=text, sampling=pb.SamplingParams(**sampling))


def test_chat_prompt_streams_an_answer_with_usage(default_server):
    req = pb.GenerateRequest(chat=pb.ChatPrompt(messages=[pb.ChatMessage(
        role="user", content="What is the capital of France? Answer in one sentence.")]),
        sampling=pb.SamplingParams(max_tokens=32, temperature=0.0))
    tokens, text, finished = collect(default_server.stub().Generate(req))
    assert "Paris" in text
    assert finished.reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert finished.usage.completion_tokens == len(tokens)
    assert finished.usage.prompt_tokens > 10  # the chat template adds a system prompt


def test_streamed_text_deltas_add_up_to_the_decoded_tokens(default_server, hf_model):
    _, tok = hf_model
    tokens, text, _ = collect(default_server.stub().Generate(
        text_request("Write a list of three fruits:", max_tokens=40, ignore_eos=True)))
    assert len(tokens) == 40
    assert text == tok.decode(tokens, skip_special_tokens=True)


def test_max_tokens_ends_with_length(default_server):
    start = time.monotonic()
    tokens, _, finished = collect(default_server.stub().Generate(
        text_request("Once upon a time", max_tokens=7, ignore_eos=True)))
    assert len(tokens) == 7 and finished.reason == pb.FINISH_REASON_LENGTH
    assert 0 < finished.scheduling_delay_ns < (time.monotonic() - start) * 1e9


def test_stop_string_ends_generation_before_it(default_server):
    stub = default_server.stub()
    prompt = "The alphabet: A, B, C,"
    _, full, _ = collect(stub.Generate(text_request(prompt, max_tokens=30, ignore_eos=True)))
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), f"no usable stop string in {full!r}"
    _, text, finished = collect(stub.Generate(
        text_request(prompt, max_tokens=30, ignore_eos=True, stop=[stop])))
    assert text == full[:full.index(stop)]
    assert finished.reason == pb.FINISH_REASON_STOP


def test_stop_token_id_ends_generation_after_it(default_server):
    stub = default_server.stub()
    tokens, _, _ = collect(stub.Generate(text_request("Count: one, two,", max_tokens=12, ignore_eos=True)))
    stop_id = tokens[5]
    first = tokens.index(stop_id)
    got, _, finished = collect(stub.Generate(
        text_request("Count: one, two,", max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id])))
    assert got == tokens[:first + 1] and finished.reason == pb.FINISH_REASON_STOP


def test_seeded_sampling_repeats_whatever_runs_beside_it(default_server):
    stub = default_server.stub()
    req = text_request("My favourite colour is", max_tokens=20, temperature=1.0, top_p=0.9, top_k=50,
                       seed=1234, ignore_eos=True)
    alone, _, _ = collect(stub.Generate(req))
    # The same request again, now sharing iterations with other sampled requests.
    others = [stub.Generate(text_request("Tell me a story", max_tokens=20, temperature=1.0, ignore_eos=True))
              for _ in range(3)]
    again, _, _ = collect(stub.Generate(req))
    for o in others:
        collect(o)
    other_seed = req.__deepcopy__()
    other_seed.sampling.seed = 99
    different, _, _ = collect(stub.Generate(other_seed))
    assert alone == again
    assert different != alone


def test_model_info_describes_the_served_model(default_server):
    info = default_server.stub().ModelInfo(pb.ModelInfoRequest())
    assert info.model == "SmolLM2-135M-Instruct"
    assert info.max_model_len == 8192 and info.vocab_size == 49152 and info.has_tokenizer
    assert info.block_size == 16 and info.num_kv_blocks > 0 and info.device == "cpu"


BAD_REQUESTS = {
    "empty prompt": (pb.GenerateRequest(), "empty prompt"),
    "empty text": (pb.GenerateRequest(text=""), "empty"),
    "prompt longer than the context": (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 8192)), "context"),
    "max_tokens below 1": (text_request("hi", max_tokens=0), "max_tokens"),
    "negative temperature": (text_request("hi", temperature=-0.5), "temperature"),
    "top_p zero": (text_request("hi", top_p=0.0), "top_p"),
    "top_p above one": (text_request("hi", top_p=1.5), "top_p"),
    "unknown token id": (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 10_000_000])), "token id"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_invalid_argument_and_the_server_keeps_serving(default_server, case):
    request, words = BAD_REQUESTS[case]
    stub = default_server.stub()
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.Generate(request))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()
    tokens, _, _ = collect(stub.Generate(text_request("Hello", max_tokens=2, ignore_eos=True)))
    assert len(tokens) == 2


def test_request_that_can_never_fit_the_cache_gets_invalid_argument(small_cache_server):
    # 48 blocks hold 768 tokens; this request may need 600 + 400.
    with pytest.raises(grpc.RpcError) as err:
        collect(small_cache_server.stub().Generate(greedy_request(list(range(100, 700)), 400)))
    # Not RESOURCE_EXHAUSTED: clients retry that, and this request can never succeed.
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tokens" in err.value.details()


def test_cancelling_a_stream_frees_its_blocks_and_spares_the_others(default_server, long_token_ids):
    stub = default_server.stub()
    keep = stub.Generate(greedy_request(long_token_ids[:50], 120))
    doomed = stub.Generate(greedy_request(long_token_ids[100:400], 1000))
    for _ in range(3):
        next(doomed)
    before = default_server.metrics()["sarathi_kv_blocks_used"]
    doomed.cancel()
    # The survivor holds at most ceil((50 + 120) / 16) = 11 blocks; the cancelled one held >= 19.
    assert wait_for(lambda: default_server.metrics()["sarathi_kv_blocks_used"] <= 11, timeout=10)
    assert before >= 19 + 1
    tokens, _, finished = collect(keep)
    assert len(tokens) == 120 and finished.reason == pb.FINISH_REASON_LENGTH
    assert wait_for(lambda: default_server.metrics()["sarathi_kv_blocks_used"] == 0)


def test_many_concurrent_streams_all_complete(default_server):
    stub = default_server.stub()
    results: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        tokens, _, _ = collect(stub.Generate(text_request(f"Number {i} is", max_tokens=8, ignore_eos=True)))
        with lock:
            results.append(len(tokens))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [8] * 16


def test_metrics_count_the_device_s_busy_and_idle_time(default_server):
    before = default_server.metrics()
    collect(default_server.stub().Generate(text_request("Count to five:", max_tokens=6, ignore_eos=True)))
    after = default_server.metrics()
    assert after["sarathi_device_busy_seconds_total"] > before["sarathi_device_busy_seconds_total"]
    assert after["sarathi_device_idle_seconds_total"] >= before["sarathi_device_idle_seconds_total"]
