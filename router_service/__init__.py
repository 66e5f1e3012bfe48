"""The router: the client API of a scheduler, in front of many schedulers (no torch)."""
