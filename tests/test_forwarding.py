"""The pass-through core against real servers: the proxy's command line and uvicorn in
front of an upstream served by uvicorn, both on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import trustme

from .servers import ProxyProcess, Upstream, free_port, run_proxy, serve_upstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[Upstream, str]]:
    app = Upstream()
    with serve_upstream(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def proxy(upstream: tuple[Upstream, str]) -> Iterator[ProxyProcess]:
    with run_proxy(upstream[1]) as process:
        yield process


def wait_for(condition: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize(
    "path",
    [
        "/_matrix/client/v3/directory/room/%23alias%3Aexample.org",
        "/_matrix/client/v3/rooms/%21room%3Ahs/state/m.room.member/%40bob%3Ahs",
        "/_matrix/client/v3/rooms/!r:hs/state/m.widget/a%2Fb%2F..%2Fc",
        "/_matrix/media/v3/download/hs/abc%20def",
    ],
)
def test_raw_path_and_query_arrive_unchanged(
    proxy: ProxyProcess, upstream: tuple[Upstream, str], path: str
) -> None:
    app, _ = upstream
    query = "filter=%7B%22room%22%3A1%7D&a=%2F&a=2"
    response = httpx.get(f"{proxy.url}{path}?{query}")
    assert response.status_code == 200
    assert app.last().raw_path == path.encode()
    assert app.last().query == query.encode()


def test_repeated_headers_survive_both_ways(
    proxy: ProxyProcess, upstream: tuple[Upstream, str]
) -> None:
    app, _ = upstream
    response = httpx.get(
        proxy.url + "/headers",
        headers=[
            ("X-Forwarded-For", "10.0.0.1"),
            ("X-Forwarded-For", "10.0.0.2"),
            ("Host", "matrix.example.org"),
            ("X-Forwarded-Proto", "https"),
        ],
    )
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert response.headers.get_list("x-multi") == ["one", "two"]
    sent = app.last().headers
    assert [v for k, v in sent if k == b"x-forwarded-for"] == [b"10.0.0.1", b"10.0.0.2"]
    assert (b"host", b"matrix.example.org") in sent
    assert (b"x-forwarded-proto", b"https") in sent


def test_hop_by_hop_headers_are_dropped_both_ways(
    proxy: ProxyProcess, upstream: tuple[Upstream, str]
) -> None:
    app, _ = upstream
    response = httpx.get(
        proxy.url + "/headers",
        headers={
            "Connection": "keep-alive, X-Private",
            "X-Private": "1",
            "Keep-Alive": "5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic eDp5",
            "X-Kept": "yes",
        },
    )
    names = {name for name, _ in app.last().headers}
    assert b"x-kept" in names
    assert not names & {b"x-private", b"keep-alive", b"te", b"proxy-authorization"}
    assert "x-hop" not in response.headers
    assert "x-multi" in response.headers


def test_no_upstream_defaults_are_added(
    proxy: ProxyProcess, upstream: tuple[Upstream, str]
) -> None:
    app, _ = upstream
    with socket.create_connection(("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"GET /plain HTTP/1.1\r\nHost: hs.example\r\nConnection: close\r\n\r\n")
        while sock.recv(65536):
            pass
    names = {name for name, _ in app.last().headers}
    assert names == {b"host"}


def test_no_cookie_crosses_users(proxy: ProxyProcess, upstream: tuple[Upstream, str]) -> None:
    app, _ = upstream
    with httpx.Client() as alice:
        alice.get(proxy.url + "/headers", headers={"Authorization": "Bearer alice"})
    with httpx.Client() as bob:
        bob.get(proxy.url + "/plain", headers={"Authorization": "Bearer bob"})
    assert b"cookie" not in {name for name, _ in app.last().headers}


def test_large_download_streams_with_flat_memory(
    proxy: ProxyProcess, upstream: tuple[Upstream, str]
) -> None:
    size = 512 * 1024 * 1024
    before = proxy.peak_rss_kib()
    received = 0
    with httpx.stream("GET", f"{proxy.url}/bytes/{size}") as response:
        assert response.headers["content-length"] == str(size)
        for chunk in response.iter_raw():
            received += len(chunk)
    assert received == size
    assert proxy.peak_rss_kib() - before < 48 * 1024


def test_large_upload_streams_with_flat_memory(
    proxy: ProxyProcess, upstream: tuple[Upstream, str]
) -> None:
    app, _ = upstream
    size = 512 * 1024 * 1024
    piece = b"y" * (1024 * 1024)

    def body() -> Iterator[bytes]:
        for _ in range(size // len(piece)):
            yield piece

    before = proxy.peak_rss_kib()
    response = httpx.post(
        proxy.url + "/_matrix/media/v3/upload",
        content=body(),
        headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        timeout=60,
    )
    assert response.json() == {"ok": True, "body_size": size}
    sent = dict(app.last().headers)
    assert sent[b"content-length"] == str(size).encode()
    assert b"transfer-encoding" not in sent
    assert proxy.peak_rss_kib() - before < 48 * 1024


def test_chunked_upload_is_forwarded(proxy: ProxyProcess, upstream: tuple[Upstream, str]) -> None:
    response = httpx.post(proxy.url + "/_matrix/media/v3/upload", content=iter([b"ab", b"cd"]))
    assert response.json() == {"ok": True, "body_size": 4}


def test_client_disconnect_mid_body_releases_upstream(
    proxy: ProxyProcess, upstream: tuple[Upstream, str]
) -> None:
    app, _ = upstream
    disconnects = app.disconnects
    with httpx.stream("GET", proxy.url + "/drip") as response:
        for _ in response.iter_raw():
            break
        assert app.open_streams == 1
    assert wait_for(lambda: app.open_streams == 0 and app.disconnects == disconnects + 1)


def test_client_disconnect_mid_long_poll_releases_upstream(
    proxy: ProxyProcess, upstream: tuple[Upstream, str]
) -> None:
    app, _ = upstream
    disconnects = app.disconnects
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(proxy.url + "/hold?seconds=30&timeout=30000", timeout=0.5)
    assert wait_for(lambda: app.open_streams == 0 and app.disconnects == disconnects + 1)


def test_long_poll_outlasts_the_read_timeout(upstream: tuple[Upstream, str]) -> None:
    _, url = upstream
    with run_proxy(url, {"IGNORE_PROXY_TIMEOUTS_READ": "0.5"}) as proxy:
        response = httpx.get(proxy.url + "/hold?seconds=1.5&timeout=2000", timeout=10)
        assert response.status_code == 200
        slow = httpx.get(proxy.url + "/hold?seconds=1.5", timeout=10)
        assert slow.status_code == 504
        assert slow.json()["errcode"] == "M_UNKNOWN"


def test_a_sliding_sync_timeout_in_the_body_is_a_long_poll(upstream: tuple[Upstream, str]) -> None:
    """MSC4186 moved `timeout` into the request body of `POST /_matrix/client/v4/sync`."""
    _, url = upstream
    path = "/_matrix/client/v4/sync?hold=1.5"
    with run_proxy(url, {"IGNORE_PROXY_TIMEOUTS_READ": "0.5"}) as proxy:
        response = httpx.post(proxy.url + path, json={"timeout": 2000, "lists": {}}, timeout=10)
        assert response.status_code == 200
        slow = httpx.post(proxy.url + path, json={"lists": {}}, timeout=10)
        assert slow.status_code == 504


@pytest.mark.slow
def test_many_idle_long_polls_do_not_exhaust_the_pool(
    proxy: ProxyProcess, upstream: tuple[Upstream, str]
) -> None:
    async def poll_all() -> list[int]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            responses = await asyncio.gather(
                *(client.get(proxy.url + "/hold?seconds=2&timeout=2000") for _ in range(1000))
            )
        return [r.status_code for r in responses]

    assert asyncio.run(poll_all()) == [200] * 1000


def test_connect_error_is_502() -> None:
    with run_proxy(f"http://127.0.0.1:{free_port()}") as proxy:
        response = httpx.get(proxy.url + "/_matrix/client/v3/pushrules/")
        assert response.status_code == 502
        assert response.json()["errcode"] == "M_UNKNOWN"
        ready = httpx.get(proxy.url + "/_ignore_proxy/health/ready")
        assert ready.status_code == 503


def test_pool_exhaustion_is_503(upstream: tuple[Upstream, str]) -> None:
    _, url = upstream
    env = {"IGNORE_PROXY_LIMITS_MAX_CONNECTIONS": "1", "IGNORE_PROXY_TIMEOUTS_POOL": "0.3"}
    with run_proxy(url, env) as proxy:

        async def two_at_once() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(timeout=10) as client:
                return await asyncio.gather(
                    client.get(proxy.url + "/hold?seconds=1.5&timeout=1500"),
                    client.get(proxy.url + "/hold?seconds=1.5&timeout=1500"),
                )

        statuses = sorted(r.status_code for r in asyncio.run(two_at_once()))
        assert statuses == [200, 503]


def test_health_endpoints(proxy: ProxyProcess) -> None:
    assert httpx.get(proxy.url + "/_ignore_proxy/health/live").json() == {"status": "ok"}
    assert httpx.get(proxy.url + "/_ignore_proxy/health/ready").status_code == 200


def test_headers_of_a_second_request_on_a_kept_alive_connection_are_bounded_too(
    proxy: ProxyProcess, upstream: tuple[Upstream, str]
) -> None:
    app, _ = upstream
    port = int(proxy.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(10)
        sock.sendall(b"GET /plain HTTP/1.1\r\nhost: x\r\n\r\n")
        first = b""
        while not (first.endswith(b"}") or first.endswith(b"\r\n0\r\n\r\n")):
            first += sock.recv(65536)  # the whole first answer (a JSON object)
        count = len(app.seen)
        big = b"GET /plain HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n"
        sock.sendall(big)
        answer = b""
        while not answer.startswith((b"HTTP/1.1 431", b"HTTP/1.1 200")):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert first.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1 431" in answer
    assert len(app.seen) == count


def test_headers_over_the_limit_are_refused_however_they_arrive(
    proxy: ProxyProcess, upstream: tuple[Upstream, str]
) -> None:
    """In two reads, the first under the bound: the parser starts the message while fed
    the first one, and the count must not start again there."""
    app, _ = upstream
    count = len(app.seen)
    port = int(proxy.url.rsplit(":", 1)[1])
    head = b"GET /plain HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        answer = b""
        with contextlib.suppress(OSError):  # the proxy may close before all is sent
            sock.sendall(head[:60_000])
            time.sleep(0.1)
            sock.sendall(head[60_000:])
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
    assert len(app.seen) == count


def test_request_body_over_the_limit_is_413(upstream: tuple[Upstream, str]) -> None:
    app, url = upstream
    with run_proxy(url, {"IGNORE_PROXY_LIMITS_MAX_REQUEST_BODY": "1000"}) as proxy:
        count = len(app.seen)
        declared = httpx.post(proxy.url + "/upload", content=b"z" * 1001)
        assert declared.status_code == 413
        assert declared.json()["errcode"] == "M_TOO_LARGE"
        chunked = httpx.post(proxy.url + "/upload", content=iter([b"z" * 600, b"z" * 600]))
        assert chunked.status_code == 413
        fits = httpx.post(proxy.url + "/upload", content=b"z" * 1000)
        assert fits.json()["body_size"] == 1000
        assert len(app.seen) == count + 1


def test_headers_over_the_limit_get_431_and_are_not_forwarded(
    proxy: ProxyProcess, upstream: tuple[Upstream, str]
) -> None:
    app, _ = upstream
    count = len(app.seen)
    big = httpx.get(proxy.url + "/plain", headers={"X-Big": "a" * 100_000})
    assert big.status_code == 431
    assert big.json()["errcode"] == "M_UNKNOWN"
    assert len(app.seen) == count
    fits = httpx.get(proxy.url + "/plain", headers={"X-Big": "a" * 30_000})
    assert fits.status_code == 200
    assert (b"x-big", b"a" * 30_000) in app.last().headers
    rss = proxy.peak_rss_kib()
    with socket.create_connection(("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\nX-Huge: ")
        try:
            for _ in range(1024):
                sock.sendall(b"b" * 65536)
        except OSError:
            pass  # the proxy closed the connection: the point
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431")
    assert proxy.peak_rss_kib() - rss < 16 * 1024


def test_expect_continue_is_answered_here_not_passed_on() -> None:
    """An upstream that never sends `100 Continue` (as many don't) must still get the body."""
    seen: list[bytes] = []

    def serve_once(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            seen.append(head)
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            conn.settimeout(5)
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        thread = threading.Thread(target=serve_once, args=(listener,), daemon=True)
        thread.start()
        with run_proxy(f"http://127.0.0.1:{listener.getsockname()[1]}") as proxy:
            response = httpx.post(
                proxy.url + "/_matrix/media/v3/upload",
                content=b"z" * 100_000,
                headers={"Expect": "100-continue"},
                timeout=10,
            )
        thread.join(timeout=5)
    assert response.status_code == 200
    assert b"expect" not in seen[0].lower()


def test_an_early_answer_stops_an_upload_the_upstream_no_longer_reads() -> None:
    """An upstream that answers 413 after it stopped reading the body (its buffers full)
    gets its answer relayed at once, not after the write timeout."""
    held: list[socket.socket] = []

    def serve_once(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        held.append(conn)  # kept open and unread: the proxy's writes stall
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        time.sleep(1.0)  # long enough for the proxy to be stuck sending the body
        body = b'{"errcode":"M_TOO_LARGE","error":"too big"}'
        conn.sendall(b"HTTP/1.1 413 X\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        threading.Thread(target=serve_once, args=(listener,), daemon=True).start()
        with run_proxy(f"http://127.0.0.1:{listener.getsockname()[1]}") as proxy:
            size = 256 * 1024 * 1024
            client = socket.create_connection(("127.0.0.1", int(proxy.url.rsplit(":", 1)[1])))
            client.sendall(
                b"POST /_matrix/media/v3/upload HTTP/1.1\r\nhost: proxy\r\n"
                b"content-length: %d\r\n\r\n" % size
            )

            def upload() -> None:
                with contextlib.suppress(OSError):
                    client.sendall(b"u" * size)  # blocks once every buffer is full

            threading.Thread(target=upload, daemon=True).start()
            client.settimeout(10)  # the write timeout is 60 s
            started = time.monotonic()
            answer = client.recv(65536)
            client.close()
        for conn in held:
            conn.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert time.monotonic() - started < 5


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    authority = trustme.CA()
    certificate = authority.issue_cert("localhost")
    folder = tmp_path_factory.mktemp("tls")
    files = {"ca": folder / "ca.pem", "cert": folder / "cert.pem"}
    authority.cert_pem.write_to_path(str(files["ca"]))
    certificate.private_key_and_cert_chain_pem.write_to_path(str(files["cert"]))
    return {name: str(path) for name, path in files.items()}


def test_an_https_upstream_is_verified_and_used(tls_files: dict[str, str]) -> None:
    app = Upstream()
    with serve_upstream(app, ssl_certfile=tls_files["cert"]) as url:
        # Trusted the usual way for OpenSSL (as for a private CA): the proxy forwards.
        with run_proxy(url, {"SSL_CERT_FILE": tls_files["ca"]}) as proxy:
            response = httpx.post(proxy.url + "/_matrix/client/v3/keys/query", content=b"{}")
            assert response.json() == {"ok": True, "body_size": 2}
        assert app.last().raw_path == b"/_matrix/client/v3/keys/query"
        # Not trusted: the certificate is refused, nothing is forwarded.
        seen = len(app.seen)
        with run_proxy(url) as proxy:
            response = httpx.get(proxy.url + "/_matrix/client/v3/pushrules/")
            assert response.status_code == 502
            assert response.json()["errcode"] == "M_UNKNOWN"
        assert len(app.seen) == seen
