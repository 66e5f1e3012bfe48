"""How close bf16 runs of the real SmolLM2 stay to its float32 model: transformers bf16, and ours
through the worker path, each against transformers float32, over 32 chat prompts and 16 greedy
tokens (the comparison of tests/gpu/test_transformers_agreement_gpu.py, whose helpers it uses).

  python -m benchmarks.bf16_agreement --device cpu            # about 3 minutes on 2 cores
  python -m benchmarks.bf16_agreement --device cuda --backend flashinfer
"""

from __future__ import annotations

import argparse

import torch

from sarathi_common.model_spec import resolve
from tests.gpu.test_transformers_agreement_gpu import compare_with_transformers


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
