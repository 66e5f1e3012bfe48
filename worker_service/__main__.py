"""`python -m worker_service [options]`: the worker alone, as `sarathi worker` runs it (a rank
0 starts its local ranks this way, and a worker image needs nothing else)."""

from __future__ import annotations

import argparse
import logging

from sarathi_common.options import add_config_file_option, add_options, from_namespace, settle
from worker_service.config import WorkerConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker_service", description=__doc__)
    add_options(parser, WorkerConfig)
    add_config_file_option(parser)
    config = from_namespace(WorkerConfig, settle(parser.parse_args(argv)))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from worker_service.main import run_worker

    run_worker(config)


if __name__ == "__main__":
    main()
