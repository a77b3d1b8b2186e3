"""ignore-proxy: enforce Matrix ignore-user semantics and MSC4406 in front of any homeserver."""

__version__ = "0.1.0"
