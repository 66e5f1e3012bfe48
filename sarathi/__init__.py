"""sarathi-serve: command-line entry point and what both services share (model resolution)."""
