"""The router's settings: one typed value built once from the command line and passed down."""

from __future__ import annotations

from dataclasses import dataclass

from router_service.placement import PlacementPolicy
from sarathi_common.auth import ApiAccessOptions, InternalTLSOptions
from sarathi_common.options import option

_MEMBERS = "schedulers"
_ROUTING = "routing"


@dataclass(frozen=True)
class RouterConfig(ApiAccessOptions, InternalTLSOptions):
    host: str = option("127.0.0.1", "address to listen on ('::' for every IPv4 and IPv6 address)")
    port: int = option(50050, "gRPC port of the API (the same API as a scheduler's)")
    metrics_port: int | None = option(None, "serve Prometheus metrics at http://HOST:PORT/metrics "
                                            "(default: off)")
    scheduler: str | None = option(
        None, "schedulers' host:port, comma-separated (static members)", group=_MEMBERS)
    scheduler_dns: str | None = option(
        None, "NAME:PORT resolved to every A/AAAA address again every --dns-interval seconds: each "
              "address is a scheduler (a Kubernetes headless Service)", group=_MEMBERS)
    dns_interval: float = option(5.0, "seconds between DNS look-ups of --scheduler-dns (default: 5)",
                                 group=_MEMBERS)
    join_port: int | None = option(
        None, "serve RouterMembership.Join on this port, where schedulers started with `--router "
              "HOST:PORT` announce themselves (with --internal-* only peers holding a certificate of "
              "the internal CA may; default: off)", group=_MEMBERS)
    join_ttl: float = option(6.0, "a joined scheduler that has not announced itself for this long "
                                  "leaves (they announce every 2 s; default: 6)", group=_MEMBERS)
    health_interval: float = option(
        1.0, "seconds between health checks of each scheduler; one refused or NOT_SERVING takes it "
             "out of rotation, and so do two that time out (default: 1)", group=_MEMBERS)
    affinity_min_match: float = option(
        0.5, "prefix affinity: a request goes to the scheduler that served the longest matching "
             "prefix when at least this share of its prompt blocks match (default: 0.5)", group=_ROUTING)
    affinity_block_bytes: int = option(
        256, "prefix affinity: the prompt is hashed in blocks of this many bytes (default: 256)",
        group=_ROUTING)
    affinity_entries: int = option(
        200_000, "prefix affinity: most prompt blocks remembered (least recently used go first)",
        group=_ROUTING)
    balance_abs_tokens: int = option(
        4096, "prefix affinity yields to least work when the matched scheduler's outstanding tokens "
              "exceed the least loaded one's by more than this and by --balance-rel times "
              "(default: 4096)", group=_ROUTING)
    balance_rel: float = option(1.5, "see --balance-abs-tokens (default: 1.5)", group=_ROUTING)
    max_message_mb: float = option(4.0, "largest request a client may send, in MiB (default: 4)",
                                   group=_ROUTING)
    internal_peer_name: str | None = option(
        None, "under internal TLS, the DNS name every scheduler's certificate carries, checked instead "
              "of the host dialled (--scheduler-dns resolves to IPs; deploy/dev-certs.sh puts "
              "sarathi-scheduler in theirs; default: the host dialled)", group="security")
    drain_seconds: float = option(
        30.0, "on SIGTERM: stop taking requests (health NOT_SERVING, new calls UNAVAILABLE), let "
              "those in flight finish for up to this long, then exit 0 (default: 30)")

    def static_schedulers(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in (self.scheduler or "").split(",") if a.strip())

    def placement_policy(self) -> PlacementPolicy:
        return PlacementPolicy(min_match=self.affinity_min_match, balance_abs=self.balance_abs_tokens,
                               balance_rel=self.balance_rel)
