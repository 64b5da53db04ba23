"""modularity."""
