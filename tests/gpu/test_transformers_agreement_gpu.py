"""The real SmolLM2-135M-Instruct weights in bf16 through the whole worker path on the GPU
(FlashInfer attention, our kernels, CUDA graphs, chunked prefills beside decodes, 32 sequences at
once) against transformers' own Llama in bf16 on the same GPU and weights:
- greedy tokens identical for the first 16 tokens of at least 90% of 32 prompts;
- wherever the two agree on the context, the log-probability of transformers' token within
  0.1 nats.

Both sides compute in bf16 with different kernels, so a near-tie may go either way; that is what
the 10% allows. The GGUF is the embedded package's or the file named by SMOLLM2_GGUF (the device
machine gets it that way: the package is larger than what a call may carry).
"""

from __future__ import annotations

import os

import pytest
import torch

from sarathi.model_spec import resolve
from tests.gpu.test_runner_gpu import BLOCK, drive
from worker_service.attention import make_backend
from worker_service.models.loader import hf_folder_for, load_model
from worker_service.runner import ModelRunner

DEV = torch.device("cuda")
NEW_TOKENS = 16
SUBJECTS = ["the moon", "photosynthesis", "binary search", "the French revolution",
            "compound interest", "a TCP handshake", "volcanoes", "the violin"]
TEMPLATES = ["Explain {} in two sentences.", "Write a short poem about {}.",
             "What are three facts about {}?", "How would you describe {} to a child?"]


def smollm2_source():
    path = os.environ.get("SMOLLM2_GGUF")
    if path:
        return resolve(path)
    try:
        return resolve(None)
    except Exception as exc:  # the embedded package is absent
        pytest.skip(f"no SmolLM2 GGUF here ({exc}); set SMOLLM2_GGUF")


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = smollm2_source()
    folder = hf_folder_for(source)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(DEV).eval()
    hf32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(DEV).eval()
    ours = load_model(source, make_backend("flashinfer", DEV), DEV, torch.bfloat16)
    return tokenizer, hf, hf32, ours


def chat_prompts(tokenizer) -> list[list[int]]:
    texts = [t.format(s) for s in SUBJECTS for t in TEMPLATES]
    return [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for text in texts]


@torch.inference_mode()
def transformers_greedy(hf, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy continuation and its logits at each step (a full forward each time:
    the prompts are short, and no cache API is involved)."""
    ids = list(prompt)
    tokens, logits = [], []
    for _ in range(NEW_TOKENS):
        row = hf(torch.tensor([ids], device=DEV)).logits[0, -1].float()
        tokens.append(int(row.argmax()))
        logits.append(row.cpu())
        ids.append(tokens[-1])
    return tokens, logits


def run_worker_path(model, prompts: list[list[int]], batch: int) -> tuple[dict, dict]:
    """The prompts `batch` at a time, each group through a fresh runner (chunked prefills, then
    decodes of the whole group: at 4 the fused skinny kernels, at 32 cuBLAS)."""
    tokens: dict[int, list[int]] = {}
    logits: dict[int, list[torch.Tensor]] = {}
    for lo in range(0, len(prompts), batch):
        runner = ModelRunner(model, DEV, torch.bfloat16, cuda_graphs=True,
                             graph_batch_sizes=(1, 2, 4, 8, 16, 32))
        runner.init_cache(batch * 32, BLOCK)
        got_tokens, got_logits = drive(runner, prompts[lo:lo + batch], NEW_TOKENS)
        for i in got_tokens:
            tokens[lo + i], logits[lo + i] = got_tokens[i], got_logits[i]
    return tokens, logits


def agreement(ref: dict, tokens: dict, logits: dict) -> tuple[int, float]:
    """(prompts whose 16 tokens equal ref's, the largest log-prob difference of ref's token at
    the steps where both picked it with the same context)."""
    identical, worst = 0, 0.0
    for i, (want, ref_logits) in ref.items():
        have = tokens[i]
        identical += have == want
        for j, token in enumerate(want):
            if have[j] != token:
                break  # the contexts differ from here on
            ref_lp = torch.log_softmax(ref_logits[j], -1)[token].item()
            lp = torch.log_softmax(logits[i][j], -1)[token].item()
            worst = max(worst, abs(ref_lp - lp))
    return identical, worst


@pytest.mark.parametrize("batch", [4, 32])
def test_smollm2_bf16_agrees_with_transformers(models, batch):
    pytest.importorskip("flashinfer")
    tokenizer, hf, hf32, ours = models
    prompts = chat_prompts(tokenizer)
    assert len(prompts) == 32
    our_tokens, our_logits = run_worker_path(ours, prompts, batch)
    ref = {i: transformers_greedy(hf, p) for i, p in enumerate(prompts)}
    identical, worst = agreement(ref, our_tokens, our_logits)
    # How far bf16 itself moves either side from the float32 model: the scale of the noise.
    ref32 = {i: transformers_greedy(hf32, p) for i, p in enumerate(prompts)}
    hf_vs_32 = agreement(ref32, {i: t for i, (t, _) in ref.items()}, {i: lg for i, (_, lg) in ref.items()})
    ours_vs_32 = agreement(ref32, our_tokens, our_logits)
    print(f"batch {batch}: ours vs transformers bf16: {identical}/32 identical, {worst:.4f} nats; "
          f"against transformers float32: transformers bf16 {hf_vs_32[0]}/32, {hf_vs_32[1]:.4f} nats, "
          f"ours {ours_vs_32[0]}/32, {ours_vs_32[1]:.4f} nats")
    assert identical >= 29, f"only {identical}/32 prompts gave transformers' 16 tokens"
    assert worst < 0.1, f"log-probs differ by {worst:.3f} nats"
