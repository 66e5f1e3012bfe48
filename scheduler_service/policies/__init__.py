"""Scheduling policies: given the queues and the block manager, what runs next iteration."""

from scheduler_service.policies.base import Policy, PolicyConfig, ScheduleOutput, SchedulerState
from scheduler_service.policies.faster_transformer import FasterTransformerPolicy
from scheduler_service.policies.orca import OrcaPolicy
from scheduler_service.policies.sarathi import DynamicSarathiPolicy, SarathiPolicy
from scheduler_service.policies.simple_chunking import SimpleChunkingPolicy
from scheduler_service.policies.vllm import VllmPolicy

POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (SarathiPolicy, DynamicSarathiPolicy, VllmPolicy, OrcaPolicy,
                        FasterTransformerPolicy, SimpleChunkingPolicy)
}


def make_policy(name: str, config: PolicyConfig) -> Policy:
    try:
        return POLICIES[name](config)
    except KeyError:
        raise ValueError(f"unknown policy {name!r}: choose from {', '.join(POLICIES)}") from None


__all__ = ["POLICIES", "Policy", "PolicyConfig", "ScheduleOutput", "SchedulerState", "make_policy"]
