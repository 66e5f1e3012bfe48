"""Everything that crosses the ZeroMQ link between the frontend and the engine process.

Commands go frontend -> engine, events engine -> frontend. The frontend sends what a client
asked for (`AddRequest`); the engine builds its own mutable `Request` from it, so engine-only
state never travels and the frontend never depends on it.
"""

from __future__ import annotations

import msgspec

from protos.batch_plan import SamplingOptions
from scheduler_service.request import FinishReason
from scheduler_service.trace import IterationRecord


# --- frontend -> engine --------------------------------------------------------------------
class AddRequest(msgspec.Struct, tag=True, array_like=True):
    """A new request, validated and tokenized by the frontend."""

    seq_id: int
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    max_tokens: int                       # already capped by the context length
    stop_token_ids: frozenset[int]        # the client's stop ids, plus EOS unless ignore_eos
    priority: int                         # higher runs first (policies that support it)
    arrival_time: float                   # monotonic seconds (one clock for both processes)
    # Tokens the client already has (a stream resumed after the engine restarted): the engine
    # recomputes prompt + these and continues after them.
    output_token_ids: list[int] = []


class AbortRequest(msgspec.Struct, tag=True, array_like=True):
    seq_id: int


class GetTrace(msgspec.Struct, tag=True, array_like=True):
    pass


class AddWorker(msgspec.Struct, tag=True, array_like=True):
    """A worker announced itself (Membership.Join): dial it and drive it as a replica."""

    address: str


# --- engine -> frontend --------------------------------------------------------------------
class EngineReady(msgspec.Struct, tag=True, array_like=True):
    model: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    block_size: int
    num_kv_blocks: int
    dtype: str
    device: str


class RequestUpdate(msgspec.Struct, array_like=True):
    """What one step did for one request."""

    seq_id: int
    new_token_ids: list[int]
    finish_reason: FinishReason | None
    # Arrival to first scheduling, sent with the request's first token only.
    scheduling_delay_s: float | None = None


class EngineStats(msgspec.Struct, array_like=True):
    """The engine after one iteration: its gauges once the step's result is applied, and the
    iteration itself (the frontend's metrics read its tokens and timings from there)."""

    iteration: IterationRecord
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    preemptions_total: int
    prefix_cache_query_tokens: int = 0   # prompt tokens looked up in the prefix cache
    prefix_cache_hit_tokens: int = 0     # of which found (not recomputed)
    # The iteration's own replica (iteration.replica); the fields above add up every replica.
    replica_running: int = 0
    replica_waiting: int = 0
    replica_kv_blocks_used: int = 0
    replica_kv_blocks_total: int = 0


class StepUpdates(msgspec.Struct, tag=True, array_like=True):
    updates: list[RequestUpdate]
    stats: EngineStats


class RequestRejected(msgspec.Struct, tag=True, array_like=True):
    seq_id: int
    message: str


class EngineFailed(msgspec.Struct, tag=True, array_like=True):
    message: str


class RequestFailed(msgspec.Struct, tag=True, array_like=True):
    """The request cannot go on: no replica came back in time, or its replica was lost and the
    scheduler fails fast rather than replaying (UNAVAILABLE: a client may retry)."""

    seq_id: int
    message: str


class ReplicasChanged(msgspec.Struct, tag=True, array_like=True):
    """A replica joined, was lost, or finished draining."""

    change: str                           # "joined", "lost", "drained"
    replica: int
    address: str
    num_serving: int                      # replicas that take new requests now
    num_kv_blocks: int                    # their KV blocks in all
    num_replayed: int = 0                 # requests moved elsewhere (lost or draining replica)
    reason: str = ""


class Trace(msgspec.Struct, tag=True, array_like=True):
    records: list[IterationRecord]


Command = AddRequest | AbortRequest | GetTrace | AddWorker
Event = EngineReady | StepUpdates | RequestRejected | EngineFailed | Trace | RequestFailed | ReplicasChanged


# msgpack through typed decoders rather than pickle: several times faster for a step's updates
# (benchmarks/host/engine_link_codec.py) and nothing but these types can arrive. Both ends are the same
# build (the engine is the frontend's child process), so structs travel as arrays, without names.
_encoder = msgspec.msgpack.Encoder()
_commands = msgspec.msgpack.Decoder(Command)
_events = msgspec.msgpack.Decoder(Event)


def encode(msg: Command | Event) -> bytes:
    return _encoder.encode(msg)


def decode_command(data: bytes) -> Command:
    return _commands.decode(data)


def decode_event(data: bytes) -> Event:
    return _events.decode(data)
