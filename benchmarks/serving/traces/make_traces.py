"""Writes chat.csv and arxiv.csv: synthetic traces with the length statistics of the paper's
workloads. Re-running it reproduces both files byte for byte.

The paper's traces (openchat ShareGPT4, arXiv summarization) are not shipped, so each length is a
lognormal fitted to the median and P90 the paper reports (Llama-2 tokenizer counts, see
/work/shared/WORKLOADS.md and traces/README.md):

    chat   prompt median 1,730  P90 5,696   output median 415   prompt + output <= 8,192
    arxiv  prompt median 7,059  P90 12,985  output median 208   prompt + output <= 16,384

The paper gives no P90 for outputs; we assume P90 = 2.5 x median for chat (long-tailed answers)
and 1.8 x median for arXiv (abstracts are of similar length). Draws are stratified (one per
quantile bin, then shuffled) so a file of a few hundred rows already has the target median and
P90. Lengths over the cap lose prompt tokens, which moves only the far tail.

    python -m benchmarks.serving.traces.make_traces
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

HERE = Path(__file__).resolve().parent
NUM_ROWS = 512
SEED = 20240710  # OSDI 2024
Z90 = NormalDist().inv_cdf(0.9)


@dataclass(frozen=True)
class LengthStats:
    median: float
    p90: float


@dataclass(frozen=True)
class TraceShape:
    name: str
    prompt: LengthStats
    output: LengthStats
    max_total_tokens: int


CHAT = TraceShape("chat", LengthStats(1730, 5696), LengthStats(415, 415 * 2.5), 8192)
ARXIV = TraceShape("arxiv", LengthStats(7059, 12985), LengthStats(208, 208 * 1.8), 16384)


def stratified_lognormal(rng: np.random.Generator, stats: LengthStats, n: int) -> np.ndarray:
    mu = np.log(stats.median)
    sigma = (np.log(stats.p90) - mu) / Z90
    quantiles = (np.arange(n) + rng.uniform(size=n)) / n
    normal = np.array([NormalDist().inv_cdf(q) for q in quantiles])
    return rng.permutation(np.rint(np.exp(mu + sigma * normal)).astype(np.int64))


def make_rows(shape: TraceShape, rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    prompts = np.maximum(1, stratified_lognormal(rng, shape.prompt, n))
    outputs = np.maximum(1, stratified_lognormal(rng, shape.output, n))
    outputs = np.minimum(outputs, shape.max_total_tokens // 2)
    prompts = np.minimum(prompts, shape.max_total_tokens - outputs)
    return list(zip(prompts.tolist(), outputs.tolist(), strict=True))


def write_trace(path: Path, rows: list[tuple[int, int]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["num_prompt_tokens", "num_output_tokens"])
        writer.writerows(rows)


def main(out_dir: Path = HERE) -> list[Path]:
    paths = []
    for i, shape in enumerate((CHAT, ARXIV)):
        rng = np.random.default_rng([SEED, i])
        path = out_dir / f"{shape.name}.csv"
        write_trace(path, make_rows(shape, rng, NUM_ROWS))
        paths.append(path)
        print(f"wrote {path} ({NUM_ROWS} rows)")
    return paths


if __name__ == "__main__":
    main()
