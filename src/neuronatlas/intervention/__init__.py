"""intervention."""
