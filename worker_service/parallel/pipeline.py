"""Pipeline parallelism: a stage keeps a contiguous slice of the layers; the first stage also
embeds, the last also norms and computes logits. Between stages travel the hidden states and
the running residual (two tensors), so a split model does exactly the additions of a whole one.

StageRunner is the ModelRunner of one rank: the same plan checks, per-sequence state and
sampling, with a stage model (or a TP shard) in place of the whole model.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
from torch import nn

from protos.batch_plan import BatchPlan, StepOutput
from worker_service import memory
from worker_service.host_batch import HostBatch
from worker_service.models.llama import LlamaModel
from worker_service.parallel.layout import split_layers
from worker_service.runner import ModelRunner


class HiddenLink(Protocol):
    """Where a stage gets its input from, and where it sends its output (see handoff.py)."""

    def send_hidden(self, step_id: int, x: torch.Tensor, residual: torch.Tensor) -> None: ...
    def recv_hidden(self, step_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]: ...


class PipelineStage(nn.Module):
    """A LlamaModel cut down to one stage; same call signature as LlamaModel, so the runner and
    the tensor-parallel transform treat it as a model."""

    def __init__(self, model: LlamaModel, stage: int, pp_size: int, link: HiddenLink) -> None:
        super().__init__()
        layers = split_layers(model.config.num_layers, pp_size)[stage]
        self.is_first, self.is_last = stage == 0, stage == pp_size - 1
        self.first_layer = layers.start
        self.config = dataclasses.replace(model.config, num_layers=len(layers))
        self.backend = model.backend
        self.rotary = model.rotary
        self.layers = nn.ModuleList(model.layers[i] for i in layers)
        # Parts a stage does not run are dropped, so their memory goes with the full model.
        self.embed_tokens = model.embed_tokens if self.is_first else None
        self.norm = model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        self.link = link
        self.step_id = -1        # set by the runner before each forward: tags the handoff

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta) -> torch.Tensor:
        if self.is_first:
            x, residual = self.embed_tokens(input_ids), None
        else:
            x, residual = self.link.recv_hidden(self.step_id, input_ids.device)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, positions, self.rotary, kv_cache, meta)
        if self.is_last:
            return x + residual
        self.link.send_hidden(self.step_id, x, residual)
        return x   # not used: a stage that does not sample computes no logits

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden)[0]).float()


def slice_stage(model: LlamaModel, stage: int, pp_size: int, link: HiddenLink
                ) -> LlamaModel | PipelineStage:
    return model if pp_size == 1 else PipelineStage(model, stage, pp_size, link)


class StageRunner(ModelRunner):
    """Runs plans on one rank. Ranks of the last stage sample (each TP rank has the gathered
    logits and the same generator, so all draw the same tokens); earlier stages never see
    logits, and learn the sampled tokens from the driver with the next plan (apply_sampled),
    before they need them as the input of a decode."""

    def __init__(self, model: LlamaModel | PipelineStage, device: torch.device, dtype: torch.dtype,
                 *, samples: bool, cuda_graphs: bool = False) -> None:
        """cuda_graphs: decode graphs on a GPU, for a whole-model (TP-only) rank: its collectives
        (NCCL) are captured with the rest and every rank captures the same graphs in the same
        order at init_cache. A pipeline stage's handoff is host work, so stages run eagerly."""
        graphs = cuda_graphs and device.type == "cuda" and not isinstance(model, PipelineStage)
        super().__init__(model, device, dtype, cuda_graphs=graphs)
        self.samples = samples

    def before_forward(self, plan: BatchPlan, batch: HostBatch) -> HostBatch:
        if isinstance(self.model, PipelineStage):
            self.model.step_id = plan.step_id
        if not self.samples:
            batch = dataclasses.replace(batch, sample_rows=[], sample_seqs=[])
        return batch

    def profile_free_memory(self, max_num_tokens: int, fraction: float = 0.9,
                            max_num_seqs: int = 0) -> int:
        """This rank's KV bytes, as ModelRunner's, but with a worst-case iteration's activations
        estimated from the shapes: one rank cannot run a trial forward alone, since its
        collectives and handoffs need every rank."""
        if self.device.type != "cuda":
            return memory.host_kv_budget(fraction)
        tokens = memory.worst_case_tokens(self.config, max_num_tokens)  # this rank's shard
        # Kept, as ModelRunner keeps it: init_cache sizes the allocator reserve by it.
        self.max_sampled_rows = memory.sampled_rows(tokens, max_num_seqs)
        activations = memory.activation_bytes_estimate(self.config, self.dtype, tokens, self.samples,
                                                       self.max_sampled_rows)
        return memory.device_kv_budget(self.device, fraction,
                                       torch.cuda.memory_allocated(self.device) + activations,
                                       self.graph_room_bytes(activations))

    def apply_sampled(self, out: StepOutput) -> None:
        if self.samples:
            return   # we drew these tokens ourselves
        for seq_id, token in zip(out.seq_ids, out.token_ids, strict=True):
            state = self.seqs.get(seq_id)
            if state is not None:
                state.token_ids.append(token)
