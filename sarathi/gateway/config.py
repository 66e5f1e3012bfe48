"""The gateway's settings, one option each (sarathi_common.options builds the parser)."""

from __future__ import annotations

from dataclasses import dataclass

from sarathi_common.options import option

API_KEY_ENV = "SARATHI_API_KEY"


@dataclass(frozen=True)
class GatewayConfig:
    upstream: str = option("127.0.0.1:50051", "gRPC address (HOST:PORT) of the scheduler or router to call")
    host: str = option("127.0.0.1", "address the HTTP API listens on")
    port: int = option(8000, "HTTP port of the OpenAI-compatible API")
    api_key: str | None = option(None, "callers must send `Authorization: Bearer KEY` (401 otherwise); "
                                       "the header is forwarded upstream as gRPC metadata (default: "
                                       f"${API_KEY_ENV}; prefer the variable: a flag shows in the "
                                       "process list)")
    upstream_ca: str | None = option(None, "call the upstream with TLS, trusting the certificates in this "
                                           "PEM file")
    request_timeout: float | None = option(None, "deadline of each upstream call in seconds (default: none)")
    access_log: bool = option(False, "log every HTTP request")
