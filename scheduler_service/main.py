"""The scheduler process: load the tokenizer, run the gRPC frontend (which starts the engine)."""

from __future__ import annotations

import asyncio

from sarathi_common.model_spec import resolve
from scheduler_service.config import SchedulerConfig
from scheduler_service.server import serve_frontend
from scheduler_service.tokenizer import load_tokenizer


def run_scheduler(config: SchedulerConfig) -> None:
    source = resolve(config.model)
    tokenizer = load_tokenizer(source, config.tokenizer)
    try:
        asyncio.run(serve_frontend(config, tokenizer, source.name))
    except KeyboardInterrupt:
        pass
