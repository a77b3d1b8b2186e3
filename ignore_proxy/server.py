"""Serving the app with uvicorn, tuned for a reverse proxy's position."""

from __future__ import annotations

import importlib.util

import uvicorn

from . import logs
from .app import create_app
from .config import Settings


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    host, port = settings.listen_address
    return uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        lifespan="on",
        # The upstream's own Server and Date headers go through; no second copy.
        server_header=False,
        date_header=False,
        # Longer than nginx's 60 s upstream keepalive, or nginx sees sporadic 502s.
        timeout_keep_alive=75,
        access_log=False,
        log_config=None,
        proxy_headers=False,
    )


def serve(settings: Settings) -> None:
    logs.configure(settings)
    uvicorn.Server(uvicorn_config(settings)).run()
