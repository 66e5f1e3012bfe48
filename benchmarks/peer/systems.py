"""The systems a peer run compares, from `--systems`: `vllm:BUDGET` is vLLM 0.25's AsyncLLM
in-process with that max_num_batched_tokens; anything else is our server with a policy, written
as in `sarathi capacity --policies` (`sarathi:512`, `sarathi:2048@slo`). Our server's own `vllm`
policy is spelt `ours:vllm:8192`, since plain `vllm:N` names the real engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from benchmarks.serving.cli import PolicyEntry, parse_policies

OURS_PREFIX = "ours:"


@dataclass(frozen=True)
class SystemEntry:
    engine: Literal["vllm", "ours"]
    label: str  # the row's name, as typed
    budget: int | None  # tokens per iteration: vLLM's max_num_batched_tokens, our --chunk-size
    policy: PolicyEntry | None = None  # ours only

    @property
    def is_vllm(self) -> bool:
        return self.engine == "vllm"


def parse_systems(text: str) -> list[SystemEntry]:
    systems = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.startswith(OURS_PREFIX):
            (entry,) = parse_policies(item.removeprefix(OURS_PREFIX))
            systems.append(SystemEntry("ours", item, entry.chunk_size, entry))
            continue
        name, _, budget = item.partition(":")
        if name == "vllm":
            if not budget.isdigit() or int(budget) < 1:
                raise SystemExit(f"--systems {item!r}: vLLM needs its token budget, e.g. vllm:2048")
            systems.append(SystemEntry("vllm", item, int(budget)))
        else:
            (entry,) = parse_policies(item)
            systems.append(SystemEntry("ours", item, entry.chunk_size, entry))
    if not systems:
        raise SystemExit("--systems names no system")
    labels = [s.label for s in systems]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"--systems lists a system twice: {text}")
    return systems


def run_order(systems: list[SystemEntry], anchor_needed: bool) -> list[SystemEntry]:
    """vLLM's decode step sets the SLO every system is judged by, so when it is to be measured
    the vLLM entries go first (in their given order; the first one measures it)."""
    if not anchor_needed:
        return list(systems)
    return [s for s in systems if s.is_vllm] + [s for s in systems if not s.is_vllm]
