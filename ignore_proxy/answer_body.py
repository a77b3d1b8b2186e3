"""Reading an answer the proxy must judge: the whole body, decoded, bounded and checked
to be UTF-8 JSON."""

from __future__ import annotations

import logging
import zlib

from .pool import BadAnswer
from .upstream import UpstreamResponse

log = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    pass


class UnreadableBody(BadAnswer):
    """An answer the proxy can't read whole: a content coding it does not decode, a
    corrupt or truncated coded stream. A BadAnswer, so a caller that does not know it
    still answers 502; one that does can say why."""


class NotUtf8Json(UnreadableBody):
    """An answer to be filtered that is not UTF-8 (RFC 8259 8.1: JSON between systems is
    UTF-8): the filters match user IDs as UTF-8 bytes and could miss them in another
    encoding."""


def _header(response: UpstreamResponse, name: bytes) -> bytes | None:
    for key, value in response.headers:
        if key.lower() == name:
            return value
    return None


async def read_body(response: UpstreamResponse, limit: int) -> bytes:
    """The whole upstream body with its content codings undone, refusing more than
    `limit` bytes (coded or decoded) with BodyTooLarge, and codings it can't undo, or
    that don't end cleanly, with UnreadableBody."""
    codings = _content_codings(response.headers)
    length = _header(response, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyTooLarge
    parts: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        parts.append(chunk)
    body = b"".join(parts)
    # The proxy asks for `identity`; an upstream that compresses anyway still gets
    # filtered. An empty body has no coded stream to undo (a 204, a 304).
    if body:
        for coding in reversed(codings):
            body = _decode(body, coding, limit)
    return body


def _content_codings(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """The codings applied, in the order they were (repeated headers and comma lists
    alike, RFC 9110 8.4), `identity` left out; refused unless all can be undone."""
    codings = []
    for name, value in headers:
        if name.lower() != b"content-encoding":
            continue
        for token in value.split(b","):
            coding = token.strip().lower()
            if coding in (b"", b"identity"):
                continue
            if coding not in (b"gzip", b"x-gzip", b"deflate"):
                raise UnreadableBody(f"unsupported content coding {coding[:32]!r}")
            codings.append(coding)
    return codings


def _decode(data: bytes, coding: bytes, limit: int) -> bytes:
    """Undo one coding, never holding more than `limit` + 1 decoded bytes: a small
    compressed answer can expand to gigabytes."""
    if coding == b"deflate":
        # RFC 9110 8.4.1.2: the zlib format; some servers send raw deflate instead.
        try:
            return _inflate(data, zlib.MAX_WBITS, limit, members=False)
        except zlib.error:
            pass
        wbits, members = -zlib.MAX_WBITS, False
    else:
        wbits, members = 16 + zlib.MAX_WBITS, True
    try:
        return _inflate(data, wbits, limit, members)
    except zlib.error as exc:
        raise UnreadableBody(f"undecodable {coding.decode()} body") from exc


def _inflate(data: bytes, wbits: int, limit: int, members: bool) -> bytes:
    """One zlib, raw deflate or gzip stream; with `members`, gzip's concatenated members
    (RFC 1952 2.2), each a whole stream. Anything after the end is refused."""
    parts: list[bytes] = []
    size = 0
    while True:
        decoder = zlib.decompressobj(wbits)
        # max_length bounds what is produced; reaching limit + 1 is enough to refuse.
        out = decoder.decompress(data, limit + 1 - size)
        size += len(out)
        if size > limit:
            raise BodyTooLarge
        parts.append(out)
        if not decoder.eof:
            raise UnreadableBody("truncated coded body")
        data = decoder.unused_data
        if not data:
            return b"".join(parts) if len(parts) > 1 else parts[0]
        if not members:
            raise UnreadableBody("bytes after the end of a coded body")


def check_utf8_json(headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """Refuse, with NotUtf8Json, an answer to be filtered that says or shows it is not
    UTF-8: a charset parameter other than utf-8, a byte order mark (UTF-8's included,
    RFC 8259 8.1), NUL bytes where JSON text starts (UTF-16/32 without a mark), or any
    byte sequence that is not UTF-8.
    `application/json` without a charset is UTF-8 by definition."""
    for name, value in headers:
        if name.lower() != b"content-type":
            continue
        for parameter in value.split(b";")[1:]:
            key, _, given = parameter.partition(b"=")
            if key.strip().lower() == b"charset":
                charset = given.strip().strip(b'"').lower()
                if charset != b"utf-8":
                    raise NotUtf8Json(f"answer in charset {charset[:32]!r}")
    if body[:3] == b"\xef\xbb\xbf" or body[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise NotUtf8Json("answer starting with a byte order mark")
    if b"\x00" in body[:4]:
        raise NotUtf8Json("answer in UTF-16 or UTF-32")
    # Bytes that are not UTF-8 (an encoded surrogate, a lone 0xff) are read one way by
    # the proxy's decoders and another by a client's (U+FFFD): a string the proxy takes
    # for someone else's ID can read as an ignored user's to the client.
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NotUtf8Json(f"answer with bytes that are not UTF-8 at {exc.start}") from None
