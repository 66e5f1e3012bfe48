"""One iteration's inputs as the runner prepares them from a plan: host lists, before they
become device tensors (read by the runner and a pipeline stage)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class HostBatch:
    """One iteration's inputs as host lists, before they become device tensors."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    query_start: list[int]
    context_lens: list[int]
    tables: list[list[int]]
    sample_rows: list[int]
    sample_seqs: list[int]
    # Inputs still on the device (tokens of steps in flight): (source, source rows, input rows).
    device_inputs: list[tuple[torch.Tensor, list[int], list[int]]] = field(default_factory=list)

    @property
    def decode_only(self) -> bool:
        return self.query_start[-1] == len(self.context_lens)
