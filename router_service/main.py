"""The router process."""

from __future__ import annotations

import asyncio

from router_service.config import RouterConfig
from router_service.server import serve_router


def run_router(config: RouterConfig) -> None:
    try:
        asyncio.run(serve_router(config))
    except KeyboardInterrupt:
        pass
