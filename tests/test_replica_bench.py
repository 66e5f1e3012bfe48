"""The multi-GPU decode benchmark's floor (benchmarks/replica/replica_bench.py): the ranks of a stage
read their shards at once, stages one after another; and the script runs a replica end to end
(on the CPU here, with no floor)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.replica.replica_bench import floor_seconds, rank_weight_bytes
from sarathi_common.model_spec import resolve
from worker_service.models.config import ModelConfig
from worker_service.models.loader import hf_config_for
from worker_service.parallel.layout import ReplicaLayout

CONFIG = ModelConfig.from_hf(hf_config_for(resolve("dummy:llama3-8b")), "llama3-8b")
TOKENS = 64 * 1024


def layout(tp: int, pp: int) -> ReplicaLayout:
    return ReplicaLayout(tp, pp, tuple(f"127.0.0.1:{7000 + k}" for k in range(tp * pp)), "127.0.0.1:6999")


def test_one_rank_floor_is_the_whole_models_weights_and_kv():
    c = CONFIG
    layer = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size \
        + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    weights = 2 * (c.num_layers * layer + c.hidden_size + c.vocab_size * c.hidden_size)  # no embedding
    kv = 2 * TOKENS * c.num_layers * 2 * c.num_kv_heads * c.head_dim
    assert rank_weight_bytes(c, layout(1, 1), 0, 2) == weights
    assert floor_seconds(c, layout(1, 1), TOKENS, torch.bfloat16, 1e12) == (weights + kv) / 1e12


def test_stages_add_up_to_the_whole_model_and_tp_ranks_share_it():
    whole = floor_seconds(CONFIG, layout(1, 1), TOKENS, torch.bfloat16, 1e12)
    assert floor_seconds(CONFIG, layout(1, 2), TOKENS, torch.bfloat16, 1e12) == whole
    tp4 = floor_seconds(CONFIG, layout(4, 1), TOKENS, torch.bfloat16, 1e12)
    assert whole / 4 < tp4 < whole / 4 * 1.01  # only the norms are on every rank


def test_replica_bench_times_each_layout_and_batch_on_the_cpu():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.replica.replica_bench", "--device", "cpu", "--model", "tiny",
         "--layouts", "2x1", "--batches", "1", "3", "--context", "40", "--steps", "2"],
        capture_output=True, text=True, timeout=300, check=True,
        cwd=Path(__file__).resolve().parents[1]).stdout
    rows = [line for line in out.splitlines() if line.startswith("| TP=2 x PP=1 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "3"]
    assert all(float(row.split("|")[3].split()[0]) > 0 for row in rows)
