"""prune pass (in progress)."""
