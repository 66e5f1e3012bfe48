"""CURVE on a replica's ZeroMQ links (`--replica-curve`, `--replica-key-file`): authentication
and encryption of everything the ranks send each other (plans, hidden states, results).

The ranks of a replica share one CURVE key pair: every mailbox serves with it, every sender
connects with it, and each mailbox's ZAP handler accepts only that public key. A process without
the secret key can neither finish the handshake nor read the traffic, so it cannot inject a plan
or a hidden state. A replica started whole on one host makes a fresh pair at start and hands it
to the ranks it spawns in their environment (never a flag: flags show in `ps`); ranks on several
hosts read the same key file.

`python -m worker_service.parallel.curve DIR` writes DIR/replica.key_secret (mode 0600) for
--replica-key-file.
"""

from __future__ import annotations

import hmac
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

KEY_ENV = "SARATHI_REPLICA_CURVE_KEY"   # rank 0 -> the local ranks it starts; read once, then removed


@dataclass(frozen=True)
class CurveKey:
    public: bytes                         # Z85, 40 bytes
    secret: bytes = field(repr=False)     # never printed

    @classmethod
    def generate(cls) -> CurveKey:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def from_file(cls, path: str) -> CurveKey:
        public, secret = zmq.auth.load_certificate(path)
        if not secret:
            raise SystemExit(f"sarathi: {path} holds no secret key: give the .key_secret file "
                             "(`python -m worker_service.parallel.curve DIR` makes one)")
        return cls(public, secret)

    def to_env(self) -> str:
        return f"{self.public.decode()} {self.secret.decode()}"   # Z85 has no space

    @classmethod
    def from_env(cls, value: str) -> CurveKey:
        public, secret = value.split(" ")
        return cls(public.encode(), secret.encode())

    def serve(self, socket: zmq.Socket) -> None:
        """Makes a bound socket a CURVE server (before bind)."""
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    def connect(self, socket: zmq.Socket) -> None:
        """Makes a connecting socket a CURVE client of a rank's mailbox (before connect)."""
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_serverkey = self.public

    def authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator:
        """The ZAP handler of `ctx`: a client is let in only with the replica's public key."""
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve_callback("*", _OnlyKey(self.public))
        return auth


class _OnlyKey:
    """A ZAP credentials provider (pyzmq calls `callback` with the client's Z85 public key)."""

    def __init__(self, public: bytes) -> None:
        self._public = public

    def callback(self, domain: str, key: bytes) -> bool:
        return hmac.compare_digest(key, self._public)


@dataclass(frozen=True)
class LinkSecurity:
    """How a rank's ZeroMQ links are protected: CURVE with `key`, and/or bound to `bind_host`
    only (None: every interface)."""

    key: CurveKey | None = None
    bind_host: str | None = None

    def bind_address(self, address: str) -> str:
        # Without a bind host, every interface at the layout's port: the host part of the layout
        # names us to peers (a name or an address of another namespace or host), and need not be
        # an address we can bind by name.
        return f"tcp://{self.bind_host or '*'}:{address.rsplit(':', 1)[1]}"


PLAINTEXT = LinkSecurity()   # no CURVE, every interface: the default


def rank_key(curve: bool, key_file: str | None) -> CurveKey | None:
    """This rank's CURVE key: from --replica-key-file, else the one its rank 0 passed in the
    environment (taken out of it, so that nothing this process starts inherits it), else None
    (plaintext links) unless CURVE was asked for."""
    passed = os.environ.pop(KEY_ENV, None)
    if key_file:
        return CurveKey.from_file(key_file)
    if passed:
        return CurveKey.from_env(passed)
    if curve:
        raise SystemExit("sarathi: --replica-curve across hosts needs --replica-key-file on every rank "
                         "(`python -m worker_service.parallel.curve DIR` makes one)")
    return None


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m worker_service.parallel.curve DIR")
    folder = Path(argv[0])
    folder.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)
    try:
        _, secret_file = zmq.auth.create_certificates(str(folder), "replica")
    finally:
        os.umask(old)
    os.chmod(secret_file, 0o600)
    print(f"{secret_file}: the replica's CURVE key pair (give it to every rank: --replica-key-file)")


if __name__ == "__main__":
    main(sys.argv[1:])
