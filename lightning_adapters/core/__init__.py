"""The engine: targeting, injection, merging and adapter state."""
