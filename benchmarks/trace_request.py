"""How one filtered `GET /sync` travels through the package: the distinct functions of
`ignore_proxy` it enters, the modules they live in, and how often the call stack crosses
from one module of the package to another (`sys.setprofile`).

    python -m benchmarks.trace_request
"""

from __future__ import annotations

import asyncio
import sys
from types import FrameType
from typing import Any

import httpx

from tests.fake_homeserver import ALICE, BOB, CHARLIE, ROOM, FakeHomeserver, build_app, message
from tests.servers import stop_served_handlers

PACKAGE = "ignore_proxy"


def _module(frame: FrameType) -> str | None:
    name = frame.f_globals.get("__name__", "")
    return name if isinstance(name, str) and name.startswith(PACKAGE) else None


async def _one_sync() -> dict[str, Any]:
    hs = FakeHomeserver()
    hs.ignore(ALICE, BOB)
    hs.answers[("GET", "/sync")] = {
        "next_batch": "s",
        "rooms": {"join": {ROOM: {"timeline": {"events": [message("$b", BOB),
                                                          message("$c", CHARLIE)]}}}},
    }  # fmt: skip
    app = build_app(hs)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy.test") as client:
        headers = {"Authorization": "Bearer alice-token"}
        await client.get("/_matrix/client/v3/sync", headers=headers)  # warm: lists, identity
        functions: set[tuple[str, str]] = set()
        modules: set[str] = set()
        crossings = 0

        def profile(frame: FrameType, event: str, arg: object) -> None:
            nonlocal crossings
            if event != "call":
                return
            module = _module(frame)
            if module is None:
                return
            functions.add((module, frame.f_code.co_qualname))
            modules.add(module)
            caller = frame.f_back
            caller_module = _module(caller) if caller is not None else None
            if caller_module is not None and caller_module != module:
                crossings += 1

        sys.setprofile(profile)
        try:
            response = await client.get("/_matrix/client/v3/sync", headers=headers)
        finally:
            sys.setprofile(None)
    await stop_served_handlers()
    assert "$b" not in response.text and "$c" in response.text
    return {"functions": len(functions), "modules": len(modules), "crossings": crossings}


def main() -> None:
    figures = asyncio.run(_one_sync())
    print(
        f"one filtered /sync: {figures['functions']} functions in {figures['modules']} "
        f"modules, {figures['crossings']} crossings between modules"
    )


if __name__ == "__main__":
    main()
