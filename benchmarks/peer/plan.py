"""Everything a peer run is configured by, fixed before the first system starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.peer.offline import OfflineConfig
from benchmarks.serving.capacity import SearchParams
from benchmarks.serving.slo import Slo
from benchmarks.serving.workload import WorkloadConfig


@dataclass(frozen=True)
class PeerPlan:
    out_dir: Path
    workload: WorkloadConfig  # the capacity probes' workload (Poisson; the rate is the probe's)
    search: SearchParams | None  # None: --skip-capacity
    probe_seconds: float  # each probe sends at least rate x this many requests
    offline: OfflineConfig | None  # None: --skip-offline
    system_time_limit_s: float  # per system, its start included
    model: str = "dummy:llama3-8b"
    max_model_len: int = 8192
    warmup_requests: int = 2
    show_progress: bool = True
    slo_p50_ttft_s: float = 2.0  # the paper's median scheduling delay bound, TTFT standing in
    anchor_batch: int = 32
    anchor_context: int = 4096
    # vLLM
    vllm_gpu_memory_utilization: float = 0.85
    vllm_max_num_seqs: int | None = 256
    vllm_enforce_eager: bool = False
    # ours
    server_args: tuple[str, ...] = ("--device=cuda",)
    startup_timeout_s: float = 300.0
    server_env: dict[str, str] = field(default_factory=dict)

    def slo(self, p99_tbt_s: float) -> Slo:
        """The same SLO for every system: `sarathi capacity`'s strict rule at this bound."""
        return Slo(p99_tbt_s=p99_tbt_s, p50_ttft_s=self.slo_p50_ttft_s, p50_scheduling_delay_s=2.0)
