"""`python -m router_service`: the router alone, without the `sarathi` command (same flags as
`sarathi router`)."""

from __future__ import annotations

import argparse
import logging

from router_service.config import RouterConfig
from router_service.main import run_router
from sarathi_common.options import add_config_file_option, add_options, from_namespace, settle


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m router_service",
                                     description="the router in front of N schedulers")
    add_options(parser, RouterConfig)
    add_config_file_option(parser)
    run_router(from_namespace(RouterConfig, settle(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
