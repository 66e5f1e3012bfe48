"""The capacity search and the time limit around one system, both keeping what was measured in
the SystemResult as it comes in."""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from rich.console import Console

from benchmarks.peer.results import SystemResult
from benchmarks.serving.capacity import Probe, SearchParams, search_capacity


async def run_search(
    result: SystemResult, probe: Callable[[float], Awaitable[Probe]], params: SearchParams
) -> None:
    """search_capacity, every probe recorded in `result` as soon as it ends."""

    async def recording(rate: float) -> Probe:
        outcome = await probe(rate)
        result.probes.append(outcome)
        return outcome

    found = await search_capacity(result.label, recording, params)
    result.capacity_rate = found.capacity_rate


async def run_within(
    limit_s: float, work: Coroutine[Any, Any, None], result: SystemResult, console: Console
) -> None:
    """Runs one system's work; a time limit or an error ends that system only, which keeps its
    measurements so far. Its cleanup (stopping the server or the engine) runs either way."""
    try:
        await asyncio.wait_for(work, timeout=limit_s)
    except asyncio.TimeoutError:
        result.error = f"stopped at its time limit ({limit_s:.0f} s)"
        console.print(f"[yellow]{result.label}: {result.error}[/]")
    except Exception as e:  # noqa: BLE001 - one broken system must not cost the others
        result.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        console.print(f"[red]{result.label} failed[/]: {result.error}")
        console.print(traceback.format_exc(), markup=False, highlight=False)
    result.settle_capacity()
