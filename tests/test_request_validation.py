"""Exact statuses for bad input (issue 21): every sampling field checked for finiteness and
range, requests that can never fit, unknown chat roles, bytes that are not UTF-8; then a fuzz of
Generate with random field values against the same server. After each, greedy output is exact
and no KV block is left in use."""

from __future__ import annotations

import grpc
from conftest import collect, greedy_request, hf_greedy, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import generation_pb2 as pb

INT32 = (-(1 << 31), (1 << 31) - 1)


def text_request(text: str = "hi", **sampling) -> pb.GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    return pb.GenerateRequest(text=text, sampling=pb.SamplingParams(**sampling))


def chat_request(*roles: str) -> pb.GenerateRequest:
    messages = [pb.ChatMessage(role=r, content="hi") for r in roles]
    return pb.GenerateRequest(chat=pb.ChatPrompt(messages=messages),
                              sampling=pb.SamplingParams(max_tokens=2, temperature=0.0))


def raw_text_request(text: bytes) -> bytes:
    """A GenerateRequest whose `text` (field 1) holds these bytes, UTF-8 or not."""
    assert len(text) < 128
    return b"\x0a" + bytes([len(text)]) + text


def raw_chat_request(role: bytes, content: bytes) -> bytes:
    message = b"\x0a" + bytes([len(role)]) + role + b"\x12" + bytes([len(content)]) + content
    chat = b"\x0a" + bytes([len(message)]) + message
    return b"\x12" + bytes([len(chat)]) + chat


def raw_generate(address: str, payload: bytes, timeout: float = 30):
    """Generate with the request's bytes as given (no client-side serialization or checks)."""
    channel = grpc.insecure_channel(address)
    call = channel.unary_stream("/sarathi.v1.Generation/Generate", request_serializer=None,
                                response_deserializer=pb.GenerateResponse.FromString)
    try:
        return collect(call(payload, timeout=timeout))
    finally:
        channel.close()


# case: (request, or raw bytes; a substring of the message). All INVALID_ARGUMENT.
BAD = {
    "empty prompt": (pb.GenerateRequest(), "empty prompt"),
    "empty text": (pb.GenerateRequest(text=""), "empty"),
    "empty chat": (pb.GenerateRequest(chat=pb.ChatPrompt()), "no messages"),
    "empty token ids": (pb.GenerateRequest(token_ids=pb.TokenIds()), "empty prompt"),
    "prompt longer than the context": (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 8192)), "context"),
    "unknown token id": (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 10_000_000])), "token id"),
    "max_tokens 0": (text_request(max_tokens=0), "max_tokens"),
    "max_tokens negative": (text_request(max_tokens=INT32[0]), "max_tokens"),
    "never fits the cache": (text_request(max_tokens=10**9), "max_tokens"),
    "temperature negative": (text_request(temperature=-0.5), "temperature"),
    "temperature inf": (text_request(temperature=float("inf")), "temperature"),
    "temperature -inf": (text_request(temperature=float("-inf")), "temperature"),
    "temperature nan": (text_request(temperature=float("nan")), "temperature"),
    "temperature denormal": (text_request(temperature=1e-45), "temperature"),
    "temperature tiny": (text_request(temperature=1e-6), "temperature"),
    "temperature huge": (text_request(temperature=1e30), "temperature"),
    "top_p zero": (text_request(top_p=0.0), "top_p"),
    "top_p above one": (text_request(top_p=1.5), "top_p"),
    "top_p nan": (text_request(top_p=float("nan")), "top_p"),
    "top_p negative": (text_request(top_p=-0.1), "top_p"),
    "top_k negative": (text_request(top_k=-1), "top_k"),
    "stop string empty": (text_request(stop=[""]), "stop"),
    "stop string too long": (text_request(stop=["x" * 5000]), "stop"),
    "too many stop strings": (text_request(stop=[str(i) for i in range(100)]), "stop strings"),
    "unknown stop token id": (text_request(stop_token_ids=[10_000_000]), "stop token id"),
    "unknown chat role": (chat_request("user", "wizard"), "role"),
    "empty chat role": (chat_request(""), "role"),
    "text not UTF-8": (raw_text_request(b"caf\xe9 \xff\xfe"), "UTF-8"),
    "chat content not UTF-8": (raw_chat_request(b"user", b"\xc3\x28"), "UTF-8"),
    "chat role not UTF-8": (raw_chat_request(b"\xff", b"hi"), "UTF-8"),
    "truncated message": (b"\x0a\x10abc", "GenerateRequest"),
    "more chat messages than the context has tokens": (chat_request(*["user"] * 8193), "messages"),
    "larger than any prompt that fits (refused unparsed)": (
        pb.GenerateRequest(text="x" * (3 * 2**20 + 2**19)), "bytes: no prompt that fits"),
}


def _blocks_free(server) -> bool:
    return server.metrics()["sarathi_kv_blocks_used"] == 0


def test_every_bad_input_gets_invalid_argument_then_greedy_output_is_exact(default_server, hf_model):
    wrong = {}
    for case, (request, words) in BAD.items():
        try:
            if isinstance(request, bytes):
                raw_generate(default_server.address, request)
            else:
                collect(default_server.stub().Generate(request, timeout=30))
            wrong[case] = "OK"
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.INVALID_ARGUMENT or words not in e.details():
                wrong[case] = f"{e.code().name}: {e.details()}"
    assert not wrong, wrong
    prompt = hf_model[1].encode("The capital of France is", add_special_tokens=False)
    tokens, _, finished = collect(default_server.stub().Generate(greedy_request(prompt, 12)))
    assert tokens == hf_greedy(hf_model, prompt, 12)
    assert finished.reason == pb.FINISH_REASON_LENGTH
    assert wait_for(lambda: _blocks_free(default_server))


def test_known_roles_and_edge_values_are_accepted(default_server):
    stub = default_server.stub()
    collect(stub.Generate(chat_request("system", "user", "assistant", "user")))
    for sampling in ({"temperature": 1e-3}, {"temperature": 100.0}, {"top_p": 1.0}, {"top_k": 10**6},
                     {"seed": (1 << 64) - 1}, {"temperature": 0.7, "top_p": 1e-30}):
        tokens, _, _ = collect(stub.Generate(text_request(max_tokens=2, ignore_eos=True, **sampling)))
        assert len(tokens) == 2, sampling


# --- fuzzing ---------------------------------------------------------------------------------
FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
# max_tokens that are invalid, short, or too large to ever fit the test server's cache (never a
# long generation on the CPU).
MAX_TOKENS = st.one_of(st.integers(INT32[0], 0), st.integers(1, 3), st.integers(6000, INT32[1]))
ROLES = st.sampled_from(["user", "system", "assistant", "tool", "wizard", "", "USER"])


@st.composite
def sampling_params(draw) -> pb.SamplingParams:
    p = pb.SamplingParams(ignore_eos=draw(st.booleans()))
    if draw(st.booleans()):
        p.max_tokens = draw(MAX_TOKENS)
    else:
        p.max_tokens = 2
    for name, strategy in (("temperature", FLOAT32), ("top_p", FLOAT32),
                           ("seed", st.integers(0, (1 << 64) - 1))):
        if draw(st.booleans()):
            setattr(p, name, draw(strategy))
    p.top_k = draw(st.one_of(st.just(0), st.integers(*INT32)))
    p.stop.extend(draw(st.lists(st.text(max_size=8), max_size=3)))
    p.stop_token_ids.extend(draw(st.lists(st.integers(0, (1 << 32) - 1), max_size=3)))
    return p


PROMPTS = st.one_of(
    st.builds(lambda t: {"text": t}, st.text(max_size=40)),
    st.builds(lambda ids: {"token_ids": pb.TokenIds(ids=ids)},
              st.lists(st.one_of(st.integers(0, 49151), st.integers(0, (1 << 32) - 1)), max_size=20)),
    st.builds(lambda ms: {"chat": pb.ChatPrompt(messages=[pb.ChatMessage(role=r, content=c) for r, c in ms])},
              st.lists(st.tuples(ROLES, st.text(max_size=20)), max_size=3)),
)
REQUESTS = st.one_of(
    st.builds(lambda prompt, sampling, priority: pb.GenerateRequest(
        **prompt, sampling=sampling, priority=priority).SerializeToString(),
        PROMPTS, sampling_params(), st.integers(*INT32)),
    st.binary(max_size=48),   # random bytes: most are not a GenerateRequest at all
)
# What a caller may get: OK, or a documented status for bad input.
DOCUMENTED = {grpc.StatusCode.INVALID_ARGUMENT}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=REQUESTS)
def test_fuzzed_requests_end_ok_or_with_a_documented_status(default_server, payload):
    try:
        raw_generate(default_server.address, payload, timeout=60)
    except grpc.RpcError as e:
        assert e.code() in DOCUMENTED, f"{e.code().name}: {e.details()} for {payload!r}"


def test_after_fuzzing_nothing_leaked_and_greedy_output_is_exact(default_server, hf_model):
    # Runs after the fuzz test above (pytest keeps the file's order).
    assert wait_for(lambda: _blocks_free(default_server))
    prompt = hf_model[1].encode("The capital of France is", add_special_tokens=False)
    tokens, _, _ = collect(default_server.stub().Generate(greedy_request(prompt, 8)))
    assert tokens == hf_greedy(hf_model, prompt, 8)
