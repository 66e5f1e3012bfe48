"""vLLM 0.25's AsyncLLM, in this process, behind the few calls the peer benchmark makes: start
it for a token budget, stream one request's new tokens, wait until it is idle, shut it down.

vLLM is imported only here and only when an engine starts, so the package (and its tests) load
on a machine without it. Its engine core still runs in a process of its own (vLLM's default), as
our worker does: the frontend in this process is what a user of `vllm serve` talks to.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IDLE_POLL_S = 0.05
# After the frontend has no request left, the core process may still be finishing an abort.
IDLE_SETTLE_S = 0.5


@dataclass(frozen=True)
class VllmOptions:
    budget: int  # max_num_batched_tokens: tokens per iteration, prefill chunks included
    max_model_len: int = 8192  # the chat trace goes up to 8192 tokens (prompt + output)
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int | None = 256  # the value the shared anchor run used; None: vLLM's default
    seed: int = 0
    enforce_eager: bool = False  # vLLM's default: torch.compile and CUDA graphs


def engine_kwargs(options: VllmOptions, model_dir: Path) -> dict[str, Any]:
    """AsyncEngineArgs for a dummy-weights model given as token ids (no tokenizer)."""
    kwargs: dict[str, Any] = dict(
        model=str(model_dir),
        load_format="dummy",
        dtype="bfloat16",
        skip_tokenizer_init=True,
        max_model_len=options.max_model_len,
        max_num_batched_tokens=options.budget,
        enable_chunked_prefill=True,
        # Benchmark prompts are random tokens: nothing to hit, and the hashing is work ours skips.
        enable_prefix_caching=False,
        gpu_memory_utilization=options.gpu_memory_utilization,
        seed=options.seed,
        enforce_eager=options.enforce_eager,
        disable_log_stats=True,
    )
    if options.max_num_seqs is not None:
        kwargs["max_num_seqs"] = options.max_num_seqs
    return kwargs


@dataclass(frozen=True)
class StreamOutput:
    """One DELTA output of a request: the tokens it added, and whether it was the last."""

    num_new_tokens: int
    finished: bool
    finish_reason: str | None


class VllmEngine:
    """`async with VllmEngine(options, model_dir) as engine:` inside the event loop that uses
    it: AsyncLLM binds its output handler to the loop it was started in."""

    def __init__(self, options: VllmOptions, model_dir: Path) -> None:
        self.options = options
        self.model_dir = model_dir
        self.llm: Any = None
        self.startup_s: float | None = None
        self._ids = itertools.count()

    async def __aenter__(self) -> VllmEngine:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        start = time.perf_counter()
        # Blocks the loop for the whole start (weights, torch.compile, CUDA graphs): nothing else
        # runs in it meanwhile.
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(self.options, self.model_dir)))
        self.startup_s = time.perf_counter() - start
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stops the engine core process, so the GPU memory is free for the next system."""
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        gc.collect()
        try:
            import torch
        except ImportError:
            return
        # Only if this process touched CUDA itself: initializing it here would make vLLM start
        # the next engine core with spawn instead of fork.
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    async def stream(self, token_ids: Sequence[int], max_tokens: int) -> AsyncIterator[StreamOutput]:
        """Greedy, exactly max_tokens new tokens (ignore_eos), one output per engine step that
        produced tokens for it (DELTA: outputs the consumer has not taken yet are merged, as
        our server's stream merges chunks). Cancelling the consumer aborts the request."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            ignore_eos=True,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
        request_id = f"peer-{next(self._ids)}"  # unique over the engine's life, probes included
        async for output in self.llm.generate({"prompt_token_ids": list(token_ids)}, params, request_id):
            completion = output.outputs[0]
            yield StreamOutput(len(completion.token_ids), output.finished, completion.finish_reason)

    def num_unfinished(self) -> int:
        return self.llm.output_processor.get_num_unfinished_requests()

    async def wait_until_idle(self, timeout_s: float) -> bool:
        """True once no request is left (a probe stopped early aborts its requests)."""
        deadline = time.monotonic() + timeout_s
        while self.num_unfinished() > 0:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(IDLE_POLL_S)
        await asyncio.sleep(IDLE_SETTLE_S)
        return True
