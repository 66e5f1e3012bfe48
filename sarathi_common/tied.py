"""`python -m sarathi_common.tied PARENT_PID COMMAND...`: asks for SIGTERM when PARENT_PID dies,
then becomes COMMAND (exec: the same pid, so signals and waits reach it). What
lifecycle.popen_tied starts."""

from __future__ import annotations

import os
import sys

from sarathi_common.lifecycle import exit_with_parent


def main(argv: list[str]) -> None:
    parent, *command = argv
    exit_with_parent(int(parent))
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
