"""Fixtures shared by the homeserver-facing unit tests (identity.py, ignore_lists.py):
a settable clock, a respx router standing in for the homeserver and a client for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import respx

from .servers import stop_served_handlers

HS = "https://hs.test"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def upstream() -> AsyncIterator[respx.MockRouter]:
    async with respx.mock(base_url=HS, assert_all_called=False) as mock:
        yield mock


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=HS) as c:
        yield c


@pytest.fixture(autouse=True)
async def _stop_served_handlers() -> AsyncIterator[None]:
    """Homeservers a test served in its loop (``servers.serve_handler``) stop with it."""
    yield
    await stop_served_handlers()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def gated(
    response: httpx.Response | Callable[[httpx.Request], httpx.Response],
) -> tuple[asyncio.Event, Callable[[httpx.Request], Awaitable[httpx.Response]]]:
    """An upstream answer held back until the returned event is set."""
    gate = asyncio.Event()

    async def answer(request: httpx.Request) -> httpx.Response:
        await gate.wait()
        return response(request) if callable(response) else response

    return gate, answer
