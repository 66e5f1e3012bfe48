"""A rich progress bar for a run: requests sent, finished and failed, and the elapsed time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks.serving.client import Progress as RunProgress


@contextmanager
def run_progress(
    description: str, total: int, console: Console | None = None
) -> Iterator[Callable[[RunProgress], None]]:
    """Yields the `on_progress` callback for `run_workload`; the bar advances as requests finish."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("sent {task.fields[sent]}  in flight {task.fields[in_flight]}"),
        TextColumn("failed {task.fields[failed]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, sent=0, in_flight=0, failed=0)

        def update(p: RunProgress) -> None:
            done = p.completed + p.failed
            bar.update(task, completed=done, sent=p.sent, in_flight=p.sent - done, failed=p.failed)

        yield update
