"""Where a hybrid iteration's device time goes: every kernel of a few iterations, grouped.

Called by gpu_bench (`--profile-hybrid`), on the runner it already built: for each hybrid shape
it runs the iteration as served under torch.profiler and prints kernel groups (matmul,
attention, norm, ...) with launches, device microseconds per iteration and share, the matmuls
against the FLOPs floor and attention against the FLOPs-plus-KV floor; then the costliest
kernels, and the device time the kernels leave idle (launch gaps: what graphs would remove).
"""

from __future__ import annotations

import statistics
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.step.decode_profile import group_of
from benchmarks.step.driver import Driver
from benchmarks.step.floors import hybrid_attention_flops, kv_bytes, matmul_params


def profile_hybrid(driver: Driver, config, chunk: int, decodes: int, context: int,
                   matmul_rate: float, copy_bw: float, repeats: int = 3, top: int = 10) -> str:
    sids = driver.cached([context] * decodes)
    driver.decode_step(sids)

    def one() -> float:
        sid, ns = driver.add(chunk + 64)
        t = driver.decode_step(sids, extra=[(sid, chunk)], new=[ns])
        driver.runner.execute(driver.plan([], [], dropped=[sid]))
        del driver.seqs[sid]
        return t

    one()  # warm
    torch.cuda.synchronize()
    walls = []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            walls.append(one())
        torch.cuda.synchronize()
    driver.drop_all()
    kernels = [(e.name, e.device_time) for e in prof.events() if e.device_type.name == "CUDA"
               and e.device_time > 0]
    per_group: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name, us in kernels:
        for table, key in ((per_group, group_of(name)), (per_kernel, name)):
            table[key][0] += 1
            table[key][1] += us
    total = sum(us for _, us in kernels) / repeats
    wall_us = statistics.median(walls) * 1e6
    matmul_floor = 2 * matmul_params(config) * (chunk + decodes) / matmul_rate * 1e6
    attn_floor = (hybrid_attention_flops(config, chunk, decodes, context) / matmul_rate
                  + kv_bytes(config, decodes * context) / copy_bw) * 1e6
    floors = {"matmul": matmul_floor, "attention": attn_floor}
    lines = [f"## hybrid {chunk}-token chunk + {decodes} decodes (ctx {context}): wall {wall_us:.0f} us, "
             f"kernels {total:.0f} us ({wall_us - total:.0f} us of gaps, the eager share that "
             f"graphs or fewer launches remove)",
             "| group | launches | us/iteration | share | floor us | ratio |",
             "| --- | --- | --- | --- | --- | --- |"]
    for group, (count, us) in sorted(per_group.items(), key=lambda kv: -kv[1][1]):
        us /= repeats
        floor = floors.get(group)
        extra = f"{floor:.0f} | {us / floor:.2f}x" if floor else "- | -"
        lines.append(f"| {group} | {count // repeats} | {us:.0f} | {us / total:.1%} | {extra} |")
    lines.append("costliest kernels (us per iteration, launches, name):")
    for name, (count, us) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"  {us / repeats:9.1f}  x{count // repeats:<4d} {name[:120]}")
    return "\n".join(lines)
