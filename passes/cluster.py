"""cluster pass (in progress)."""
