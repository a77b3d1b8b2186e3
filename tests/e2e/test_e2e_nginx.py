"""The shipped nginx configs: valid, and routing what they claim where they claim.

Routing is checked against two echo backends standing in for ignore-proxy and the
homeserver, so it does not depend on the proxy being complete.

`test_every_spelling_reaches_the_proxy` sends, byte for byte (`harness/raw.py`: httpx
would resolve dot segments itself), every endpoint of `ignore_proxy.routes.ROUTES` (and
the few the configs route beyond it) under every version prefix and in every spelling
nginx or a homeserver reads differently: dot segments raw and encoded, `%2F`, doubled
slashes, encoded and case-changed literals, `;`, backslash, `#`, suffixes after Synapse's
open-ended patterns, and `..` climbing out of the client API into locations that go to the
homeserver. Both configs must hand each one to the proxy, raw target unchanged: the
homeserver routes the raw path, so a request nginx matched by its normalised URI but
the homeserver serves as an endpoint of the table would be a leak. A new route in the
table is covered without touching this file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ignore_proxy.routes import ROUTES

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
from .harness.raw import raw_request

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


def test_health_checks_only_on_the_internal_listener(routed: tuple[str, NginxServer]) -> None:
    """The proxy's own endpoints are not public; the health checks are on the internal
    listener (README: Deploying behind nginx)."""
    _, server = routed
    with httpx.Client(trust_env=False, timeout=10) as client:
        for path in (
            "/_ignore_proxy/health/live",
            "/_ignore_proxy/health/ready",
            "/_ignore_proxy/anything",
            # nginx resolves these to /_ignore_proxy/health/live before it picks a location.
            "/_matrix/client/v3/../../../_ignore_proxy/health/live",
            "/_matrix/client/v3/%2e%2e/%2e%2e/%2e%2e/_ignore_proxy/health/live",
        ):
            public = asyncio.run(raw_request(server.url, "GET", path))
            assert public.status_code == 404 and "backend" not in public.text, (path, public)
        for path in ("/_ignore_proxy/health/live", "/_ignore_proxy/health/ready"):
            internal = client.get(server.health_url + path)
            assert internal.status_code == 200
            assert internal.json()["backend"] == "proxy" and internal.json()["raw_path"] == path
        # Nothing else on the internal listener.
        assert client.get(server.health_url + "/_matrix/client/versions").status_code == 404


# --- Every endpoint the proxy acts on, in every spelling ---------------------------------

# Version prefixes: none (`/_matrix/client/sync` is read as /sync by the proxy), the ones
# Synapse, Conduit and Dendrite serve (r0, v3, v1, api/v1, unstable, v4 for MSC4186's
# sliding sync), an unstable namespace (Conduit's org.matrix.msc3575 sync; Synapse's
# org.matrix.msc3391, msc3440, msc3030 are the same shape), and the deepest the proxy
# reads (api/v1 plus a namespace).
PREFIXES = ("", "r0", "v1", "v3", "v4", "api/v1", "unstable", "unstable/org.matrix.msc3575",
            "api/v1/org.example.ns")  # fmt: skip

# Values for the variables of route paths; none needs a doubtful spelling itself.
SAMPLES = {
    "room_id": "%21room%3Alocalhost",
    "event_id": "%24abc%2Bdef",
    "user_id": ALICE,
    "device_id": "ABCDEF",
    "rel_type": "m.thread",
    "event_type": "m.reaction",
}

# Routed to the proxy by the configs beyond the route table: MSC2836 (Dendrite;
# `rewrite_event_relationships` exists), account deactivation (token lifecycle).
EXTRA_ENDPOINTS = (("POST", "event_relationships", False), ("POST", "account/deactivate", False))

ENDPOINTS: tuple[tuple[str, str, bool], ...] = (
    *((route.method, route.path, route.open_ended) for route in ROUTES),
    *EXTRA_ENDPOINTS,
)

# Where `..` can climb to from the client API: each lands in a location that goes to the
# homeserver (in one config or both) by its normalised URI.
LANDINGS = (
    "_matrix/media/v3/download/localhost/abc",
    "_matrix/client/v1/media/download/localhost/abc",
    "_matrix/client/v3/pushrules/",
    "_matrix/federation/v1/version",
    "_matrix/key/v2/server",
    "_synapse/client/pick_idp",
)


# nginx truncates $uri at `#`: `/_matrix/client#/...` is `/_matrix/client`, which the
# selected config's `location /_matrix/client/` answers with its own 301 to
# `/_matrix/client/` (the all-client config's regex location does not).
NGINX_MAY_ANSWER = ("fragment ",)


def _fill(pattern: str) -> tuple[list[str], list[bool]]:
    """A route path's segments with sample values, and which of them are fixed."""
    segments, fixed = [], []
    for part in pattern.split("/"):
        if part.startswith("{"):
            name, _, value = part[1:-1].partition("=")
            segments.append(value or SAMPLES[name])
            fixed.append(False)
        else:
            segments.append(part)
            fixed.append(True)
    return segments, fixed


def _encode_first(word: str) -> str:
    return f"%{ord(word[0]):02x}{word[1:]}"


def spellings(pattern: str, open_ended: bool) -> list[tuple[str, str]]:
    """(what, raw target) for one endpoint under every prefix."""
    segments, fixed = _fill(pattern)
    rest = "/".join(segments)
    last_fixed = max(i for i, f in enumerate(fixed) if f)
    upper = "/".join(s.upper() if f else s for s, f in zip(segments, fixed, strict=True))
    encoded = "/".join(_encode_first(s) if i == last_fixed else s for i, s in enumerate(segments))
    out: list[tuple[str, str]] = []
    for prefix in PREFIXES:
        v = f"{prefix}/" if prefix else ""
        base = f"/_matrix/client/{v}{rest}"
        depth = base.count("/")
        cases = {
            "plain": base,
            "query": f"{base}?access_token=t&x=/../%2F",
            "upper case": f"/_MATRIX/CLIENT/{v.upper()}{upper}",
            "encoded literal": f"/_matrix/client/{v}{encoded}",
            "encoded client": f"/_matrix/%63lient/{v}{rest}",
            "doubled slashes": f"/_matrix//client/{v.replace('/', '//')}/{rest}",
            "dot": f"/_matrix/client/{v}./{rest}",
            "dot-dot": f"/_matrix/client/{v}x/../{rest}",
            "encoded dot": f"/_matrix/client/{v}%2e/{rest}",
            "encoded dot-dot": f"/_matrix/client/{v}x/%2E%2E/{rest}",
            "half-encoded dot-dot": f"/_matrix/client/{v}x/.%2e/{rest}",
            "encoded slash": f"/_matrix/client%2F{v.replace('/', '%2F')}{rest}",
            "semicolon": f"/_matrix/client/{v};x/../{rest}",
            "semicolon after": f"{base};x=1",
            "backslash": f"/_matrix/client/{v}x\\..\\{rest}",
            "fragment": f"/_matrix/client#/{v}{rest}",
            "trailing slash": f"{base}/",
            "trailing dot": f"{base}/.",
        }
        if open_ended:  # Synapse serves these as the endpoint itself
            cases |= {
                "suffix": f"{base}X",
                "suffix segment": f"{base}/x",
                "suffix dot-dot": f"{base}/..",
                "suffix dot-dot twice": f"{base}/../..",
                "suffix encoded dot-dot": f"{base}/%2e%2e/%2E%2E",
                "suffix encoded slash": f"{base}%2F..%2F..",
            }
        for landing in LANDINGS:
            cases[f"climb to /{landing}"] = base + "/.." * depth + "/" + landing
            cases[f"encoded climb to /{landing}"] = base + "/%2e%2e" * depth + "/" + landing
            cases[f"slash-encoded climb to /{landing}"] = (
                base + "%2F.." * depth + "%2F" + landing.replace("/", "%2F")
            )
        out += [(f"{what} [{prefix or 'unversioned'}]", target) for what, target in cases.items()]
    return out


def _endpoint_id(endpoint: tuple[str, str, bool]) -> str:
    return f"{endpoint[0]} {endpoint[1]}"


async def _where(url: str, method: str, targets: list[tuple[str, str]]) -> list[str]:
    """Send each target raw; describe every one that did not reach the proxy unchanged."""
    limit = asyncio.Semaphore(8)

    async def one(what: str, target: str) -> str | None:
        async with limit:
            resp = await raw_request(url, method, target, body=b"{}")
        if resp.status_code != 200 or not resp.text.startswith("{"):
            # nginx's own answer: no backend saw the request, so nothing leaked; allowed
            # for the spellings of NGINX_MAY_ANSWER only.
            if what.startswith(NGINX_MAY_ANSWER):
                return None
            return f"{what}: {target} -> nginx answered {resp.status_code} itself"
        got = resp.json()
        if got["backend"] != "proxy":
            return f"{what}: {target} -> {got['backend']}"
        if got["raw_path"] != target:
            return f"{what}: {target} -> proxy got {got['raw_path']}"
        return None

    found = await asyncio.gather(*(one(what, target) for what, target in targets))
    return [line for line in found if line is not None]


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=_endpoint_id)
async def test_every_spelling_reaches_the_proxy(
    routed: tuple[str, NginxServer], endpoint: tuple[str, str, bool]
) -> None:
    _, server = routed
    method, pattern, open_ended = endpoint
    targets = spellings(pattern, open_ended)
    wrong = await _where(server.url, method, targets)
    assert not wrong, f"{len(wrong)} of {len(targets)} missed the proxy:\n" + "\n".join(wrong)


def test_spellings_cover_the_real_prefixes() -> None:
    """The prefixes homeservers serve (issue 15) are among those tried, with the route."""
    tried = {target for method, pattern, open_ended in ENDPOINTS
             for _, target in spellings(pattern, open_ended)}  # fmt: skip
    room, event = SAMPLES["room_id"], SAMPLES["event_id"]
    for path in (
        "/_matrix/client/versions",
        "/_matrix/client/v4/sync",
        "/_matrix/client/unstable/org.matrix.msc3575/sync",
        "/_matrix/client/unstable/event_relationships",
        f"/_matrix/client/v1/rooms/{room}/threads",
        f"/_matrix/client/v1/rooms/{room}/timestamp_to_event",
        f"/_matrix/client/v1/rooms/{room}/relations/{event}/m.thread/m.reaction",
        f"/_matrix/client/api/v1/rooms/{room}/messages",
        f"/_matrix/client/r0/user/{ALICE}/account_data/m.ignored_user_list",
        f"/_matrix/client/v3/user/{ALICE}/account_data/m.ignored_user_list/../..",
        "/_matrix/client/v3/delete_devicesX",
    ):
        assert path in tried, path


# Everyday client traffic the proxy does nothing with: the selected config must keep it
# away from the proxy (its IDs are percent-encoded as clients encode them).
PASS_THROUGH = [
    ("PUT", f"/_matrix/client/v3{ROOM}/send/m.room.message/m1700000000000.1"),
    ("PUT", f"/_matrix/client/v3{ROOM}/state/m.room.member/{ALICE}"),
    ("GET", f"/_matrix/client/v3{ROOM}/state"),
    ("GET", f"/_matrix/client/v3{ROOM}/members?membership=join"),
    ("PUT", f"/_matrix/client/v3{ROOM}/typing/{ALICE}"),
    ("POST", f"/_matrix/client/v3{ROOM}/receipt/m.read/%24abc%2Bdef"),
    ("POST", f"/_matrix/client/v3{ROOM}/read_markers"),
    ("PUT", f"/_matrix/client/v3{ROOM}/redact/%24abc%2Bdef/txn1"),
    ("PUT", f"/_matrix/client/v3/user/{ALICE}/rooms/%21room%3Alocalhost/account_data/m.tag"),
    ("POST", f"/_matrix/client/v3/user/{ALICE}/filter"),
    ("GET", "/_matrix/client/v3/pushrules/"),
    ("POST", "/_matrix/client/v3/keys/query"),
    ("POST", "/_matrix/client/v3/keys/upload"),
    ("PUT", "/_matrix/client/v3/sendToDevice/m.room.encrypted/txn2"),
    ("GET", "/_matrix/client/v3/capabilities"),
    ("GET", "/_matrix/client/v3/account/whoami"),
    ("GET", f"/_matrix/client/v3/profile/{ALICE}/displayname"),
    ("GET", "/_matrix/client/v3/directory/room/%23caf%C3%A9%3Alocalhost"),
    ("POST", "/_matrix/client/v3/login"),
    ("GET", "/_matrix/client/v1/media/download/localhost/abc"),
    ("GET", "/_matrix/client/v1/media/thumbnail/localhost/abc?width=64&height=64"),
]

# Not client API, with spellings the maps would find doubtful under /_matrix/client/:
# plainly under another API's prefix, so the homeserver in both configs (federation never
# goes through the proxy; room version 3 event IDs hold `%2F`).
OTHER_API_DOUBTFUL = [
    ("GET", "/_matrix/federation/v1/event/%24abc%2Fdef%2Bg"),
    ("GET", "/_matrix/key/v2/query/server%2Eexample"),
    ("GET", "/_matrix/media/v3/download/localhost/a%2Db"),
    ("GET", "/_synapse/client/sso%2Fx"),
]

# Client API the proxy does nothing with, in a spelling the selected config cannot judge
# from the normalised URI: to the proxy, which relays what it reads one way only.
DOUBTFUL_PASS_THROUGH = [
    ("PUT", f"/_matrix/client/v3{ROOM}/redact/%24abc%2Fdef/txn1"),
    ("GET", f"/_matrix/client/v3{ROOM}/state/m.room.member/%40%2e%2e%3Alocalhost"),
    ("GET", "/_matrix/client/v3//pushrules/"),
    ("GET", "/_matrix/client/v3/x/../pushrules/"),
]

EXPECTED_RAW: dict[str, list[tuple[str, str, str]]] = {
    "ignore-proxy-all-client.conf": [
        *((m, p, "homeserver" if "/media/" in p else "proxy") for m, p in PASS_THROUGH),
        *((m, p, "homeserver") for m, p in OTHER_API_DOUBTFUL),
        *((m, p, "proxy") for m, p in DOUBTFUL_PASS_THROUGH),
    ],
    "ignore-proxy-selected.conf": [
        *((m, p, "homeserver") for m, p in PASS_THROUGH + OTHER_API_DOUBTFUL),
        *((m, p, "proxy") for m, p in DOUBTFUL_PASS_THROUGH),
    ],
}


async def test_pass_through_raw(routed: tuple[str, NginxServer]) -> None:
    shipped, server = routed
    wrong: list[str] = []
    for method, target, backend in EXPECTED_RAW[shipped]:
        resp = await raw_request(server.url, method, target, body=b"{}")
        assert resp.status_code == 200, f"{target}: {resp.status_code} {resp.text[:200]}"
        got = resp.json()
        if (got["backend"], got["raw_path"]) != (backend, target):
            wrong.append(f"{method} {target} -> {got['backend']} {got['raw_path']}, not {backend}")
    assert not wrong, "\n".join(wrong)
