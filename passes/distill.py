"""distill pass (in progress)."""
