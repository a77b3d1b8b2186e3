"""uvicorn's httptools protocol with a bound on the size of a request's headers.

httptools accepts headers of any size and uvicorn keeps them all, so one client could
make the proxy hold megabytes per connection. Past the bound the client gets 431 and
the connection closes; nothing is forwarded.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_BODY = msgspec.json.encode({"errcode": "M_UNKNOWN", "error": "Request headers too large"})
_REJECTION = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n" % len(_BODY) + _BODY
)


class BoundedHeadersProtocol(HttpToolsProtocol):
    max_header_bytes: ClassVar[int] = 64 * 1024
    _header_bytes = 0
    _in_headers = True
    _tail = b""  # the last bytes seen, in case the blank line is split between reads

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
        {"max_header_bytes": max_header_bytes},
    )
