"""The offline throughput workload: N requests of fixed lengths, all sent at t = 0 (1000 x
(512 in, 256 out) by default, the figure the shared vLLM anchor reports)."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.serving.workload import RequestSpec, WorkloadConfig, build_workload


@dataclass(frozen=True)
class OfflineConfig:
    num_requests: int = 1000
    prompt_tokens: int = 512
    output_tokens: int = 256
    seed: int = 0


def offline_specs(config: OfflineConfig) -> list[RequestSpec]:
    return build_workload(
        WorkloadConfig(
            num_requests=config.num_requests,
            seed=config.seed,
            lengths="fixed",
            prompt_tokens=(config.prompt_tokens, config.prompt_tokens),
            output_tokens=(config.output_tokens, config.output_tokens),
            arrivals="static",
        )
    )
