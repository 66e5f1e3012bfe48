"""The real SmolLM2-135M-Instruct weights in bf16 through the whole worker path on the GPU
(FlashInfer attention, our kernels, CUDA graphs, chunked prefills beside decodes) against
transformers' own Llama on the same GPU and weights, over 32 chat prompts and 16 greedy tokens.

The bar: our bf16 run stays as close to the float32 model as transformers' own bf16 run does.
Counting identical 16-token continuations against transformers bf16 (the issue's first wording:
at least 29 of 32, log-probs within 0.1 nats) cannot be met by any bf16 implementation of this
model: on the CPU, transformers bf16 gives its own float32 run's 16 tokens for only 21 of the 32
prompts, and differs from it by up to 0.15 nats where they agree. The model has many near-ties
(top-two logit gaps of 0.01-0.2), and logits in bf16 are 0.125 apart at magnitude 16-32, so the
rounding of either side picks among them. Those figures are printed with every run.
On an H200 (2026-11-26) transformers bf16 matched its float32 run on 20/32 prompts (0.134 nats at
worst); ours matched float32 on 19/32 at batch 4 and 22/32 at batch 32 (0.134-0.138 nats).

The GGUF is the embedded package's or the file named by SMOLLM2_GGUF (how a GPU host without the
package gets it: see benchmarks/device/gpu_session.sh).
The comparison is benchmarks/step/bf16_agreement.py's: `python -m benchmarks.step.bf16_agreement
--device cpu` prints it on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.step.bf16_agreement import compare_with_transformers
from sarathi_common.model_spec import resolve


def smollm2_source():
    path = os.environ.get("SMOLLM2_GGUF")
    if path:
        return resolve(path)
    try:
        return resolve(None)
    except Exception as exc:  # the embedded package is absent
        pytest.skip(f"no SmolLM2 GGUF here ({exc}); set SMOLLM2_GGUF")


@pytest.mark.parametrize("batch", [4, 32])
def test_smollm2_bf16_is_as_close_to_float32_as_transformers_bf16(batch):
    pytest.importorskip("flashinfer")
    result = compare_with_transformers(smollm2_source(), torch.device("cuda"), "flashinfer", batch)
    for name, (identical, worst) in result.items():
        print(f"batch {batch}: {name}: {identical}/32 identical, {worst:.4f} nats at worst")
    hf_identical, hf_worst = result["transformers bf16 vs float32"]
    identical, worst = result["ours bf16 vs transformers float32"]
    # Slack of 3 prompts (10%): each side's near-ties fall its own way.
    assert identical >= hf_identical - 3, f"ours {identical}/32 against transformers' {hf_identical}/32"
    assert worst <= max(0.1, 1.5 * hf_worst), f"ours {worst:.3f} nats against transformers' {hf_worst:.3f}"
