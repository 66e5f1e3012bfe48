"""Where a hybrid iteration's device time goes: every kernel of a few iterations, grouped.

Called by gpu_bench (`--profile-hybrid`), on the runner it already built: for each hybrid shape
it runs the iteration as served under torch.profiler and prints kernel groups (matmul,
attention, norm, ...) with launches, device microseconds per iteration and share, the matmuls
against the FLOPs floor and attention against the FLOPs-plus-KV floor; then the costliest
kernels, and the device time the kernels leave idle: one iteration alone (host time included),
then iterations launched ahead as served, whose idle time is split by the kernels around it.
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
    with profile(activities=[ProfilerActivity.CUDA]) as served_prof:
        served_s = driver.served_hybrid(sids, chunk, 2 * repeats)
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
    lines += served_idle(served_prof, 2 * repeats, served_s)
    return "\n".join(lines)


def served_idle(prof, steps: int, served_s: float, top: int = 8) -> list[str]:
    """Where the device waits while iterations are launched ahead, as the worker serves: the
    time between one kernel's end and the next one's start, summed per transition (group of
    the kernel before -> group of the kernel after). Small gaps are the device's own cost of
    one more launch (graph or not); large ones mean the host fell behind."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type.name == "CUDA" and e.device_time > 0)
    per_pair: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    # The costliest gap between two named kernels, per transition: which launch it is.
    example: dict[str, tuple[float, str]] = {}
    small = large = 0.0
    end, before = spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        gap = start - end
        if gap > 0:
            key = f"{group_of(before)} -> {group_of(name)}"
            per_pair[key][0] += 1
            per_pair[key][1] += gap
            if gap > example.get(key, (0.0, ""))[0]:
                example[key] = (gap, f"{before[:60]} -> {name[:60]}")
            if gap < 20:
                small += gap
            else:
                large += gap
        if stop >= end:
            end, before = stop, name
    busy = sum(stop - start for start, stop, _ in spans)
    lines = [f"served ({steps} iterations launched ahead, {served_s * 1e3:.2f} ms each under the "
             f"profiler): kernels {busy / steps:.0f} us, device idle {(small + large) / steps:.0f} us "
             f"per iteration ({small / steps:.0f} in gaps under 20 us, {large / steps:.0f} in longer ones)",
             "idle by transition (us per iteration, gaps per iteration):"]
    for pair, (count, us) in sorted(per_pair.items(), key=lambda kv: -kv[1][1])[:top]:
        gap, names = example[pair]
        lines.append(f"  {us / steps:9.1f}  x{count / steps:<6.1f} {pair} (longest {gap:.0f} us: {names})")
    return lines
