"""`python -m benchmarks.serving bench|capacity ...`, the same as `sarathi bench|capacity`."""

from __future__ import annotations

import sys

from benchmarks.serving.cli import main_bench, main_capacity

COMMANDS = {"bench": main_bench, "capacity": main_capacity}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m benchmarks.serving {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
