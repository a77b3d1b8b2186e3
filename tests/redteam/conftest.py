"""Red-team reproductions. The end-to-end ones reuse the e2e fixtures (real Synapse,
stock and no-ignore, and the proxy CLI)."""

from tests.e2e.conftest import http, make_world, stack, world  # noqa: F401
