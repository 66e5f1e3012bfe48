import sys

from benchmarks.peer.cli import main

if __name__ == "__main__":  # vLLM may start its engine process with spawn, which re-imports this
    sys.exit(main())
