"""Names every Triton kernel compiled once the worker serves.

Triton compiles a kernel variant on its first call with a new specialization (an integer
argument's divisibility by 16, a new constexpr). On a machine whose Triton cache is cold each
compile stalls every stream in flight for up to seconds, so every variant serving needs should
be compiled while the worker starts (graph capture, the scheduler's start-up profile). A variant
that was not shows up here, by name and arguments, as a warning in the worker's log.
"""

from __future__ import annotations

import logging


def watch_triton_compiles(log: logging.Logger) -> bool:
    """Logs each kernel variant Triton compiles from now on (first time per variant); False
    where Triton is not installed."""
    try:
        from triton import knobs
    except ImportError:
        return False
    seen: set[str] = set()

    def compiled(*, repr: str, **_) -> None:  # noqa: A002 - Triton's keyword
        if repr not in seen:
            seen.add(repr)
            log.warning("Triton compiled a kernel while serving (a stall on a cold cache): %s", repr)

    knobs.runtime.jit_post_compile_hook = compiled
    return True
