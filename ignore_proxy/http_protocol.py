"""uvicorn's httptools protocol with a bound on the size of a request's headers, and a
hook that tells the app at once when a client goes away.

httptools accepts headers of any size and uvicorn keeps them all, so one client could
make the proxy hold megabytes per connection. Past the bound the client gets 431 and
the connection closes; nothing is forwarded.

uvicorn tells an app that its client left only through `receive()`, which a request
must then await the whole time: a task, a future and a timer per request, thousands of
them with as many clients parked in `/sync`. The hook (`DisconnectHook`, in the
request's `scope["extensions"]`, calls.py) is a callback instead, called from
`connection_lost`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .calls import DISCONNECT_EXTENSION, DisconnectHook

_BODY = msgspec.json.encode({"errcode": "M_UNKNOWN", "error": "Request headers too large"})
_REJECTION = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n" % len(_BODY) + _BODY
)


class BoundedHeadersProtocol(HttpToolsProtocol):
    # Slots, not instance attributes: uvicorn's own fill the instance dictionary to
    # the size past which CPython stops sharing its keys between instances, and three
    # more made every connection's dictionary a full one of its own.
    __slots__ = ("_header_bytes", "_in_headers", "_tail")
    max_header_bytes: ClassVar[int] = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_bytes = 0
        self._in_headers = True
        self._tail = b""  # the last bytes seen, in case the blank line is split between reads

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # The hook itself, not the dict of it ASGI's extensions hold: the app reading it is
        # this proxy's, and one object is the least a parked request can hold.
        self.scope["extensions"] = {DISCONNECT_EXTENSION: DisconnectHook()}  # type: ignore[dict-item]

    def on_headers_complete(self) -> None:
        self._in_headers = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        # The next request on a kept-alive connection is counted from its first byte.
        # Not in `on_message_begin`: the parser calls it while being fed a read that
        # was counted already, and a reset there forgot that read.
        self._header_bytes = 0
        self._in_headers = True
        self._tail = b""
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete:
            hook = cycle.scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
            if isinstance(hook, DisconnectHook) and hook.callback is not None:
                callback, hook.callback = hook.callback, None
                callback()

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            # Counted before parsing: the headers may end anywhere in this read.
            window = self._tail + data
            end = window.find(b"\r\n\r\n")
            seen = len(data) if end < 0 else max(end + 4 - len(self._tail), 0)
            self._header_bytes += seen
            self._tail = window[-3:]
            if self._header_bytes > self.max_header_bytes:
                self.transport.write(_REJECTION)
                self.transport.close()
                return
        super().data_received(data)


def bounded_headers_protocol(max_header_bytes: int) -> type[BoundedHeadersProtocol]:
    return type(
        "BoundedHeadersProtocol",
        (BoundedHeadersProtocol,),
        {"max_header_bytes": max_header_bytes, "__slots__": ()},
    )
