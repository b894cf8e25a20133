"""lowrank pass (in progress)."""
