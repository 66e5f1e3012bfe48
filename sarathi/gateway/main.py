"""`sarathi gateway` / `python -m sarathi.gateway`: the OpenAI-compatible API as its own process.

Starlette on uvicorn: the ASGI stack vLLM and SGLang serve the same API with, maintained and
fast (uvicorn parses HTTP with httptools when it is installed). The event loop is asyncio's own,
which grpc.aio supports fully."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from sarathi.gateway.config import API_KEY_ENV, GatewayConfig
from sarathi_common.options import add_config_file_option, add_options, from_namespace, settle

log = logging.getLogger("sarathi.gateway")


def run_gateway(config: GatewayConfig) -> None:
    import uvicorn

    from sarathi.gateway.app import create_app

    if config.api_key is None and os.environ.get(API_KEY_ENV):
        config = dataclasses.replace(config, api_key=os.environ[API_KEY_ENV])
    log.info("OpenAI-compatible API on http://%s:%d/v1 -> gRPC %s%s", config.host, config.port,
             config.upstream, "" if config.api_key else " (no API key: every caller is let in)")
    uvicorn.run(create_app(config), host=config.host, port=config.port, loop="asyncio",
                access_log=config.access_log, log_level="info" if config.access_log else "warning",
                timeout_graceful_shutdown=5)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m sarathi.gateway", description=__doc__.split("\n\n")[0])
    add_options(parser, GatewayConfig)
    add_config_file_option(parser)
    args = settle(parser.parse_args(sys.argv[1:] if argv is None else argv))
    run_gateway(from_namespace(GatewayConfig, args))


if __name__ == "__main__":
    main()
