"""Driving a runner (or a replica's rank 0) without a scheduler: plans made by hand, shaped as
the scheduler would send them. Shared by the benchmarks (replica/, step/bf16_agreement) and the
tests, which import it from here; nothing here imports tests/.

- `PlanMaker`: plans for given shapes of iteration (whole-prompt prefills, decodes of chosen
  sequences); the caller executes them.
- `drive`: a runner through chunked prefills mixed with decodes until every prompt has its new
  tokens, recording the logits each sequence was sampled from.
- `launch_ahead`: plans run as the worker serves them, each launched before the previous one's
  tokens are read.
"""

from __future__ import annotations

import torch

import worker_service.runner as runner_module
from protos.batch_plan import BatchPlan, NewSequence, SamplingOptions
from worker_service.runner import ModelRunner

BLOCK = 16


def launch_ahead(runner: ModelRunner, plans: list[BatchPlan]) -> list[list[int]]:
    """Each plan's sampled tokens, plan i+1 launched before plan i's tokens reach the host (so
    its decodes read their inputs on the device)."""
    got: list[list[int]] = []
    previous = None
    for plan in plans:
        step = runner.launch(plan)
        if previous is not None:
            got.append(runner.finish(previous).token_ids)
        previous = step
    got.append(runner.finish(previous).token_ids)
    return got


class PlanMaker:
    """Hand-made plans: what the scheduler would send for a given shape of iteration."""

    def __init__(self) -> None:
        self.step = 0
        self.next_seq = 0
        self.next_block = 0
        self.seqs: dict[int, list[int]] = {}   # seq -> [known tokens, computed, blocks]

    def _blocks(self, seq: int, upto: int) -> list[int]:
        state = self.seqs[seq]
        need = -(-upto // BLOCK) - state[2]
        new = list(range(self.next_block, self.next_block + need))
        self.next_block += need
        state[2] += need
        return new

    def new_sequences(self, n: int, prompt_len: int) -> BatchPlan:
        """Registers n sequences and prefills their whole prompts in one plan."""
        plan = BatchPlan(self.step)
        for _ in range(n):
            seq = self.next_seq
            self.next_seq += 1
            self.seqs[seq] = [prompt_len, 0, 0]
            plan.new_sequences.append(NewSequence(seq, [(7 * seq + i) % 500 + 1 for i in range(prompt_len)],
                                                  [], SamplingOptions(), prompt_len))
            plan.new_sequences[-1].block_table = self._blocks(seq, prompt_len)
            plan.schedule(seq, 0, prompt_len, [])
            self.seqs[seq][0] += 1   # the sampled token
            self.seqs[seq][1] = prompt_len
        self.step += 1
        return plan

    def hybrid(self, seqs: list[int], prompt_len: int) -> BatchPlan:
        """Decodes of `seqs` beside one new prompt of prompt_len tokens prefilled whole."""
        plan = self.decode(seqs)
        self.step -= 1   # one plan: new_sequences counts the step
        prompt = self.new_sequences(1, prompt_len)
        plan.new_sequences += prompt.new_sequences
        plan.schedule(prompt.seq_ids[0], 0, prompt_len, [])
        return plan

    def decode(self, seqs: list[int]) -> BatchPlan:
        plan = BatchPlan(self.step)
        for seq in seqs:
            known, computed, _ = self.seqs[seq]
            plan.schedule(seq, computed, 1, self._blocks(seq, computed + 1))
            self.seqs[seq][0] += 1
            self.seqs[seq][1] = computed + 1
        self.step += 1
        return plan


def drive(runner: ModelRunner, prompts: list[list[int]], new_tokens: int, chunk: int = 96,
          sampling: SamplingOptions | None = None) -> tuple[dict, dict]:
    """Chunked prefills mixed with decodes, as the scheduler would. -> tokens and logits per seq."""
    logits_seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(prompts))}
    real_sample = runner_module.sample

    def recording_sample(logits, options, index, gen):
        out = real_sample(logits, options, index, gen)
        for sid, row in zip(current, logits, strict=True):
            logits_seen[sid].append(row.float().cpu())
        return out

    runner_module.sample = recording_sample
    try:
        per_seq = 64 // BLOCK * 8
        seqs = {i: dict(tokens=list(p), computed=0, out=[]) for i, p in enumerate(prompts)}
        plan = BatchPlan(0, new_sequences=[
            NewSequence(i, p, list(range(i * per_seq, (i + 1) * per_seq)),
                        sampling or SamplingOptions(), num_prompt_tokens=len(p))
            for i, p in enumerate(prompts)])
        step = 0
        while any(len(s["out"]) < new_tokens for s in seqs.values()):
            budget = chunk
            for i, s in seqs.items():
                if len(s["out"]) >= new_tokens or budget == 0:
                    continue
                n = min(len(s["tokens"]) - s["computed"], budget)
                plan.schedule(i, s["computed"], n, [])
                s["computed"] += n
                budget -= n
            current = [i for i, c, n in zip(plan.seq_ids, plan.num_computed_tokens,
                                            plan.num_scheduled_tokens, strict=True)
                       if c + n == len(seqs[i]["tokens"])]
            out = runner.execute(plan)
            assert out.seq_ids == current
            for sid, tok in zip(out.seq_ids, out.token_ids, strict=True):
                seqs[sid]["tokens"].append(tok)
                seqs[sid]["out"].append(tok)
            step += 1
            plan = BatchPlan(step)
        return {i: s["out"][:new_tokens] for i, s in seqs.items()}, logits_seen
    finally:
        runner_module.sample = real_sample
