"""How close bf16 runs of the real SmolLM2 stay to its float32 model: transformers bf16, and ours
through the worker path, each against transformers float32, over 32 chat prompts and 16 greedy
tokens. tests/gpu/test_transformers_agreement_gpu.py holds our bf16 run to the same comparison.

  python -m benchmarks.step.bf16_agreement --device cpu            # about 3 minutes on 2 cores
  python -m benchmarks.step.bf16_agreement --device cuda --backend flashinfer
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.step.harness import BLOCK, drive
from sarathi_common.model_spec import resolve
from worker_service.attention import make_backend
from worker_service.models.loader import hf_folder_for, load_model
from worker_service.runner import ModelRunner

NEW_TOKENS = 16
SUBJECTS = ["the moon", "photosynthesis", "binary search", "the French revolution",
            "compound interest", "a TCP handshake", "volcanoes", "the violin"]
TEMPLATES = ["Explain {} in two sentences.", "Write a short poem about {}.",
             "What are three facts about {}?", "How would you describe {} to a child?"]


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
        row = hf(torch.tensor([ids], device=hf.device)).logits[0, -1].float()
        tokens.append(int(row.argmax()))
        logits.append(row.cpu())
        ids.append(tokens[-1])
    return tokens, logits


def run_worker_path(model, prompts: list[list[int]], batch: int, device: torch.device) -> tuple[dict, dict]:
    """The prompts `batch` at a time, each group through a fresh runner (chunked prefills, then
    decodes of the whole group)."""
    tokens: dict[int, list[int]] = {}
    logits: dict[int, list[torch.Tensor]] = {}
    for lo in range(0, len(prompts), batch):
        runner = ModelRunner(model, device, torch.bfloat16, graph_batch_sizes=(1, 2, 4, 8, 16, 32))
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


def compare_with_transformers(source, device: torch.device, backend: str, batch: int) -> dict:
    """Ours in bf16 and transformers in bf16, each against transformers in float32, and ours
    against transformers bf16: {name: (identical of 32, worst nats)}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = hf_folder_for(source)
    prompts = chat_prompts(AutoTokenizer.from_pretrained(folder))
    refs = {}
    for dtype in (torch.float32, torch.bfloat16):
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        refs[dtype] = {i: transformers_greedy(hf, p) for i, p in enumerate(prompts)}
        del hf
    ours = load_model(source, make_backend(backend, device), device, torch.bfloat16)
    tokens, logits = run_worker_path(ours, prompts, batch, device)
    hf16 = refs[torch.bfloat16]
    return {
        "transformers bf16 vs float32": agreement(refs[torch.float32], {i: t for i, (t, _) in hf16.items()},
                                                  {i: lg for i, (_, lg) in hf16.items()}),
        "ours bf16 vs transformers float32": agreement(refs[torch.float32], tokens, logits),
        "ours bf16 vs transformers bf16": agreement(hf16, tokens, logits),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None,
                    help="attention backend (default: torch on cpu, flashinfer on cuda)")
    ap.add_argument("--batch", type=int, default=32, help="prompts run together")
    ap.add_argument("--model", default=None, help="a SmolLM2 GGUF (default: the embedded one)")
    args = ap.parse_args()
    device = torch.device(args.device)
    backend = args.backend or ("torch" if device.type == "cpu" else "flashinfer")
    result = compare_with_transformers(resolve(args.model), device, backend, args.batch)
    print(f"| comparison ({args.device}, batch {args.batch}) | identical 16-token continuations | "
          "largest log-prob difference where the contexts agree |")
    print("| --- | --- | --- |")
    for name, (identical, worst) in result.items():
        print(f"| {name} | {identical}/32 | {worst:.3f} nats |")


if __name__ == "__main__":
    main()
