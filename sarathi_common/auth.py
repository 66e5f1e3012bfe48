"""Who may call the client API: a bearer token (`--token-file` or $SARATHI_TOKEN) checked in a
server interceptor before any handler runs (the request is not even decoded), and TLS on the
port (`--tls-cert-file`/`--tls-key-file`, client certificates with `--tls-client-ca-file`).

Health stays open (load balancers probe it without credentials). Membership.Join is open on the
API port only while internal TLS is off: with it, the scheduler serves Membership on its
--internal-port alone, behind mutual TLS (InternalTLS). The token never appears in a log or an
error message.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from sarathi_common.options import option

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/sarathi.v1.Membership/")
TOKEN_ENV = "SARATHI_TOKEN"


def load_token(token_file: str | None) -> str | None:
    """The token from the file (surrounding whitespace dropped) or the environment; None: off."""
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise SystemExit(f"sarathi: the token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def _denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that only answers UNAUTHENTICATED (its request
    is left as bytes: nothing of an unauthenticated caller is parsed)."""
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization")
        if sent is None:
            return _denied(handler, "missing token: send `authorization: Bearer TOKEN` metadata")
        if isinstance(sent, str):
            sent = sent.encode()
        if not hmac.compare_digest(sent, self._expected):
            return _denied(handler, "wrong token")
        return handler


def server_credentials(cert_file: str | None, key_file: str | None,
                       client_ca_file: str | None) -> grpc.ServerCredentials | None:
    """TLS credentials for the API port, or None for plaintext."""
    if not cert_file and not key_file:
        if client_ca_file:
            raise SystemExit("sarathi: --tls-client-ca-file needs --tls-cert-file and --tls-key-file")
        return None
    if not (cert_file and key_file):
        raise SystemExit("sarathi: TLS needs both --tls-cert-file and --tls-key-file")
    pair = (Path(key_file).read_bytes(), Path(cert_file).read_bytes())
    ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


@dataclass(frozen=True)
class InternalTLS:
    """Mutual TLS for the deployment's own links (router-scheduler, scheduler-worker): both ends
    hold a certificate signed by the deployment's CA and accept only peers that do."""

    ca_file: str
    cert_file: str
    key_file: str

    @classmethod
    def from_files(cls, ca_file: str | None, cert_file: str | None,
                   key_file: str | None) -> InternalTLS | None:
        """None when none of the three is set (plaintext internal links); all three or a
        one-line error."""
        given = [f for f in (ca_file, cert_file, key_file) if f]
        if not given:
            return None
        if len(given) != 3:
            raise SystemExit("sarathi: internal mutual TLS needs --internal-ca-file, "
                             "--internal-cert-file and --internal-key-file together")
        return cls(ca_file, cert_file, key_file)  # type: ignore[arg-type]

    def _read(self) -> tuple[bytes, bytes, bytes]:
        return (Path(self.ca_file).read_bytes(), Path(self.cert_file).read_bytes(),
                Path(self.key_file).read_bytes())

    def server_credentials(self) -> grpc.ServerCredentials:
        ca, cert, key = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca, cert, key = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                            certificate_chain=cert)

    def channel_options(self, peer_name: str | None) -> list[tuple[str, str]]:
        """Channel options checking the peer's certificate for `peer_name` instead of the host
        dialled: workers are reached by addresses (pod IPs) no static certificate can name, so
        their certificates carry a role name (deploy/dev-certs.sh: sarathi-worker) instead."""
        return [("grpc.ssl_target_name_override", peer_name)] if peer_name else []


def caller_identity(context) -> str:
    """Who is calling, for a sync gRPC servicer: the subject of the client certificate under
    mutual TLS (stable across the caller's connections and restarts), else its connection
    (address and port: stable for one channel only)."""
    subject = context.auth_context().get("x509_subject")
    if subject:
        return "certificate " + subject[0].decode(errors="replace")
    return "connection " + context.peer()


_SECURITY = "security"


@dataclass(frozen=True)
class ApiAccessOptions:
    """Who may call a client API (a scheduler's or a router's): the options, once for both."""

    token_file: str | None = option(
        None, "require `authorization: Bearer TOKEN` on every call but health (UNAUTHENTICATED "
              f"otherwise); the file holds the token (default: ${TOKEN_ENV}, or no token)",
        group=_SECURITY)
    tls_cert_file: str | None = option(None, "serve the API over TLS with this PEM certificate "
                                             "(chain)", group=_SECURITY)
    tls_key_file: str | None = option(None, "the certificate's PEM private key", group=_SECURITY)
    tls_client_ca_file: str | None = option(
        None, "require client certificates signed by these PEM CAs (mutual TLS)", group=_SECURITY)

    def api_token(self) -> str | None:
        return load_token(self.token_file)

    def api_credentials(self) -> grpc.ServerCredentials | None:
        return server_credentials(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)


@dataclass(frozen=True)
class InternalTLSOptions:
    """Mutual TLS on the deployment's own links (router-scheduler, scheduler-worker, Join): the
    options every role has, and the InternalTLS they make."""

    internal_ca_file: str | None = option(
        None, "mutual TLS on the internal links (router-scheduler, scheduler-worker, joins): the "
              "deployment's CA (PEM); with --internal-cert-file and --internal-key-file, this "
              "process dials and accepts internal peers only with certificates the CA signed",
        group=_SECURITY)
    internal_cert_file: str | None = option(None, "this process's certificate for the internal "
                                                  "links (PEM, signed by --internal-ca-file)",
                                            group=_SECURITY)
    internal_key_file: str | None = option(None, "the internal certificate's PEM private key",
                                           group=_SECURITY)

    def internal_tls(self) -> InternalTLS | None:
        return InternalTLS.from_files(self.internal_ca_file, self.internal_cert_file,
                                      self.internal_key_file)
