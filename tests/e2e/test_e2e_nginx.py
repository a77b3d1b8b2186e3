"""The shipped nginx configs: valid, and routing what they claim where they claim.

Routing is checked against two echo backends standing in for ignore-proxy and the
homeserver, so it does not depend on the proxy being complete.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .harness.echo import echo_server
from .harness.nginx import (
    SHIPPED,
    NginxServer,
    main_conf,
    nginx_test,
    render_site,
    start_nginx,
    write_config,
)
from .harness.procs import free_port

pytestmark = pytest.mark.e2e

ROOM = "/rooms/%21room%3Alocalhost"
ALICE = "%40alice%3Alocalhost"
# An event ID of an old room version, with an encoded slash in it.
EVENT = "%24abc%2Bd%2Fef"

# Paths every shipped config must send to ignore-proxy.
TO_PROXY = [
    "/_matrix/client/versions",
    "/_matrix/client/v3/sync?since=s1&timeout=0",
    "/_matrix/client/r0/sync",
    "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?pos=1",
    f"/_matrix/client/v3{ROOM}/messages?dir=b&limit=10",
    f"/_matrix/client/r0{ROOM}/messages",
    f"/_matrix/client/v3{ROOM}/context/{EVENT}?limit=5",
    f"/_matrix/client/v3{ROOM}/event/{EVENT}",
    f"/_matrix/client/v3/events/{EVENT}",
    "/_matrix/client/v3/events?from=s1",
    f"/_matrix/client/v1{ROOM}/relations/{EVENT}",
    f"/_matrix/client/v1{ROOM}/relations/{EVENT}/m.thread",
    f"/_matrix/client/v1{ROOM}/relations/{EVENT}/m.annotation/m.reaction",
    f"/_matrix/client/v1{ROOM}/threads?include=all",
    f"/_matrix/client/v1{ROOM}/timestamp_to_event?ts=1&dir=b",
    f"/_matrix/client/unstable/org.matrix.msc3030{ROOM}/timestamp_to_event?ts=1&dir=f",
    f"/_matrix/client/v3{ROOM}/initialSync",
    "/_matrix/client/v3/initialSync",
    "/_matrix/client/v3/search?next_batch=x",
    "/_matrix/client/v3/notifications?limit=5",
    f"/_matrix/client/v3/user/{ALICE}/account_data/m.ignored_user_list",
    f"/_matrix/client/r0/user/{ALICE}/account_data/m.ignored_user_list?access_token=t",
    f"/_matrix/client/unstable/org.matrix.msc3391/user/{ALICE}/account_data/m.ignored_user_list",
    "/_matrix/client/v3/logout",
    "/_matrix/client/v3/logout/all",
    "/_matrix/client/v3/devices/ABCDEF",
    "/_matrix/client/v3/delete_devices",
    "/_matrix/client/v3/account/password",
    "/_ignore_proxy/health/live",
]

# Paths every shipped config must send straight to the homeserver.
TO_HOMESERVER = [
    "/_matrix/federation/v1/version",
    "/_matrix/key/v2/server",
    "/_matrix/media/v3/download/localhost/abc",
    "/_matrix/client/v1/media/download/localhost/abc",
    "/_synapse/client/oidc/callback?code=1",
]

# Only the selected-endpoints config sends these to the homeserver (the all-client
# config sends them through the proxy).
CLIENT_API_NOT_NEEDING_PROXY = [
    f"/_matrix/client/v3{ROOM}/send/m.room.message/txn1",
    f"/_matrix/client/v3{ROOM}/state",
    f"/_matrix/client/v3{ROOM}/members",
    "/_matrix/client/v3/keys/query",
    "/_matrix/client/v3/login",
    "/_matrix/client/v3/directory/room/%23alias%3Alocalhost",
    f"/_matrix/client/v3/profile/{ALICE}",
]

EXPECTED: dict[str, dict[str, str]] = {
    "ignore-proxy-all-client.conf": {
        **{p: "proxy" for p in TO_PROXY + CLIENT_API_NOT_NEEDING_PROXY},
        **{p: "homeserver" for p in TO_HOMESERVER},
    },
    "ignore-proxy-selected.conf": {
        **{p: "proxy" for p in TO_PROXY},
        **{p: "homeserver" for p in TO_HOMESERVER + CLIENT_API_NOT_NEEDING_PROXY},
    },
}


@pytest.mark.parametrize("shipped", SHIPPED)
def test_nginx_t_accepts_shipped_config(shipped: str, tmp_path: Path) -> None:
    conf = write_config(tmp_path, shipped, free_port(), "127.0.0.1:1", "127.0.0.1:2")
    result = nginx_test(conf, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_both_shipped_configs_fit_in_one_nginx(tmp_path: Path) -> None:
    sites = [render_site(shipped, free_port(), "127.0.0.1:1", "127.0.0.1:2") for shipped in SHIPPED]
    site = tmp_path / "sites.conf"
    site.write_text("\n".join(sites))
    conf = tmp_path / "nginx.conf"
    conf.write_text(main_conf(tmp_path, site))
    result = nginx_test(conf, tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module", params=SHIPPED)
def routed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, NginxServer]]:
    shipped: str = request.param
    with echo_server("proxy") as proxy, echo_server("homeserver") as hs:
        server = start_nginx(tmp_path_factory.mktemp("nginx-routing"), shipped, proxy, hs)
        try:
            yield shipped, server
        finally:
            server.stop()


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_routes_and_raw_uri(routed: tuple[str, NginxServer], method: str) -> None:
    shipped, server = routed
    wrong: list[str] = []
    with httpx.Client(trust_env=False, timeout=10) as client:
        for path, backend in EXPECTED[shipped].items():
            resp = client.request(method, server.url + path, content=b"{}")
            assert resp.status_code == 200, f"{path}: {resp.status_code} {resp.text[:200]}"
            got = resp.json()
            if got["backend"] != backend:
                wrong.append(f"{path} -> {got['backend']}, expected {backend}")
            # No URI part on proxy_pass: the request URI reaches the backend untouched.
            assert got["raw_path"] == path, got
            assert got["method"] == method
            # `Host $host`: the client's host name, without the port.
            assert got["host"] == "127.0.0.1", got
            assert got["x_forwarded_for"] == "127.0.0.1", got
    assert not wrong, "\n".join(wrong)
