"""CURVE on a replica's ZeroMQ links (issue 21): a process without the replica's key cannot put
a message into a rank's mailbox, and a replica with CURVE on samples the tokens of one worker."""

from __future__ import annotations

import random
import stat
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import zmq
from conftest import ROOT
from test_parallel_exactness import TINY, TINY_PROMPT_LENGTHS, run

from sarathi_common.net import free_port
from worker_service.parallel.curve import PLAINTEXT, CurveKey, LinkSecurity
from worker_service.parallel.handoff import PLAN, Mailbox
from worker_service.parallel.layout import ReplicaLayout


def layout() -> ReplicaLayout:
    return ReplicaLayout(1, 2, (f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"), "127.0.0.1:1")


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def push(ctx: zmq.Context, endpoint: str, key: CurveKey | None = None, server_key: bytes | None = None,
         ) -> zmq.Socket:
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 0)
    if key is not None:
        s.curve_secretkey, s.curve_publickey = key.secret, key.public
        s.curve_serverkey = server_key or key.public
    s.connect(endpoint)
    return s


def received(mailbox: Mailbox, wait_s: float = 1.5) -> list[list[bytes]]:
    time.sleep(wait_s)   # the handshakes and the mailbox's receiver thread
    got = []
    while not mailbox.control.empty():
        got.append(mailbox.control.get())
    return got


def test_a_stranger_cannot_inject_a_plan_into_a_curve_mailbox(zmq_context):
    lay, key = layout(), CurveKey.generate()
    mailbox = Mailbox(lay, 0, LinkSecurity(key, "127.0.0.1"))
    try:
        endpoint = lay.endpoint(0)
        # Sockets kept open until the end: a closed one drops what it has not sent yet.
        senders = {b"plaintext stranger": push(zmq_context, endpoint),
                   # Knowing the replica's public key is not enough without its secret key.
                   b"stranger with its own key": push(zmq_context, endpoint, CurveKey.generate(), key.public),
                   b"rank 1": push(zmq_context, endpoint, key)}
        for text, socket in senders.items():
            socket.send_multipart([PLAN, b"1", text])
        assert received(mailbox) == [[PLAN, b"rank 1"]]
    finally:
        mailbox.close()


def test_without_curve_a_stranger_can_inject_which_is_why_the_flag_exists(zmq_context):
    lay = layout()
    mailbox = Mailbox(lay, 0, PLAINTEXT)
    try:
        stranger = push(zmq_context, lay.endpoint(0))
        stranger.send_multipart([PLAN, b"1", b"stranger"])
        assert received(mailbox) == [[PLAN, b"stranger"]]
    finally:
        mailbox.close()


def test_the_key_file_command_writes_a_private_key_pair(tmp_path):
    out = subprocess.run([sys.executable, "-m", "worker_service.parallel.curve", str(tmp_path)], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    secret_file = tmp_path / "replica.key_secret"
    key = CurveKey.from_file(str(secret_file))
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert key.secret.decode() not in out and key.secret.decode() not in repr(key)


@pytest.mark.slow
def test_a_replica_with_curve_on_samples_the_tokens_of_one_worker():
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 512) for _ in range(n)] for n in TINY_PROMPT_LENGTHS]
    reference = run(TINY, prompts)
    # TP=2 x PP=2: plans to every rank, hidden states stage to stage, results back, all over CURVE.
    got = run((*TINY, "--pipeline-parallel-size", "2", "--tensor-parallel-size", "2", "--replica-curve"),
              prompts)
    for length, tokens, expected in zip(TINY_PROMPT_LENGTHS, got, reference, strict=True):
        assert tokens == expected, f"prompt of {length} tokens diverged"
