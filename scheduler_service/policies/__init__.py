"""Scheduling policies: given the queues and the block manager, what runs next iteration."""

from scheduler_service.policies.base import Policy, PolicyConfig, ScheduleOutput, SchedulerState
from scheduler_service.policies.sarathi import SarathiPolicy

POLICIES: dict[str, type[Policy]] = {"sarathi": SarathiPolicy}


def make_policy(name: str, config: PolicyConfig) -> Policy:
    try:
        return POLICIES[name](config)
    except KeyError:
        raise ValueError(f"unknown policy {name!r}: choose from {', '.join(POLICIES)}") from None


__all__ = ["POLICIES", "Policy", "PolicyConfig", "ScheduleOutput", "SchedulerState", "make_policy"]
