"""textualization."""
