"""attnbench's built-in implementations, one module each, registered through the public hook."""
