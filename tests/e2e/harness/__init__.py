"""Helpers for the end-to-end suite: real Synapse, the real proxy CLI, real nginx."""
