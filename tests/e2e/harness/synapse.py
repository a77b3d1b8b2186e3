"""Start a throw-away Synapse (SQLite, loopback, client listener only)."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
from signedjson.key import generate_signing_key, write_signing_keys

from .procs import ManagedProcess, free_port

Mode = Literal["stock", "no-ignore"]

SERVER_NAME = "localhost"
NO_IGNORE_LAUNCHER = Path(__file__).resolve().parent.parent / "synapse_no_ignore.py"

_BIG_RATE = {"per_second": 10000, "burst_count": 100000}


# An application service registered with every Synapse of the suite: its token acts as any
# `@as_*` user through `?user_id=` (masquerading).
APPSERVICE_TOKEN = "e2e-appservice-token"
APPSERVICE_SENDER = "as_bridge"
APPSERVICE_USERS = "@as_.*"


def appservice_registration(workdir: Path) -> Path:
    path = workdir / "appservice.yaml"
    path.write_text(
        json.dumps(
            {
                "id": "e2e-appservice",
                "url": None,
                "as_token": APPSERVICE_TOKEN,
                "hs_token": secrets.token_hex(16),
                "sender_localpart": APPSERVICE_SENDER,
                "rate_limited": False,
                "namespaces": {
                    "users": [{"exclusive": False, "regex": APPSERVICE_USERS}],
                    "rooms": [],
                    "aliases": [],
                },
            }
        )
    )
    return path


def synapse_config(workdir: Path, port: int, shared_secret: str) -> dict[str, object]:
    return {
        "app_service_config_files": [str(appservice_registration(workdir))],
        "server_name": SERVER_NAME,
        "public_baseurl": f"http://127.0.0.1:{port}/",
        "pid_file": str(workdir / "homeserver.pid"),
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": True,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {
            "name": "sqlite3",
            "args": {"database": str(workdir / "homeserver.db")},
        },
        "media_store_path": str(workdir / "media_store"),
        "signing_key_path": str(workdir / "signing.key"),
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "report_stats": False,
        "enable_registration": False,
        "registration_shared_secret": shared_secret,
        "macaroon_secret_key": secrets.token_hex(16),
        "form_secret": secrets.token_hex(16),
        "bcrypt_rounds": 4,
        "presence": {"enabled": False},
        "caches": {"sync_response_cache_duration": 0},
        "federation_domain_whitelist": [],
        "url_preview_enabled": False,
        "enable_metrics": False,
        "rc_message": _BIG_RATE,
        "rc_registration": _BIG_RATE,
        "rc_login": {"address": _BIG_RATE, "account": _BIG_RATE, "failed_attempts": _BIG_RATE},
        "rc_joins": {"local": _BIG_RATE, "remote": _BIG_RATE},
        "rc_joins_per_room": _BIG_RATE,
        "rc_invites": {"per_room": _BIG_RATE, "per_user": _BIG_RATE, "per_issuer": _BIG_RATE},
        "rc_3pid_validation": _BIG_RATE,
        "rc_admin_redaction": _BIG_RATE,
        "rc_room_creation": _BIG_RATE,
        "rc_media_create": _BIG_RATE,
        "rc_key_requests": _BIG_RATE,
        "rc_presence": {"per_user": _BIG_RATE},
        "rc_delayed_event_mgmt": _BIG_RATE,
        "rc_reports": _BIG_RATE,
        "rc_user_directory": _BIG_RATE,
        "rc_profile": _BIG_RATE,
    }


@dataclass
class SynapseServer:
    mode: Mode
    url: str
    shared_secret: str
    process: ManagedProcess

    def stop(self) -> None:
        self.process.stop()


def launch_synapse(mode: Mode, workdir: Path) -> SynapseServer:
    """Start Synapse without waiting for it (call :func:`wait_synapse` next)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "media_store").mkdir(exist_ok=True)
    port = free_port()
    shared_secret = secrets.token_hex(16)
    key_path = workdir / "signing.key"
    with open(key_path, "w") as f:
        write_signing_keys(f, [generate_signing_key("a_e2e")])
    cfg_path = workdir / "homeserver.yaml"
    # JSON is valid YAML.
    cfg_path.write_text(json.dumps(synapse_config(workdir, port, shared_secret), indent=1))
    if mode == "stock":
        argv = [sys.executable, "-m", "synapse.app.homeserver", "-c", str(cfg_path)]
    else:
        argv = [sys.executable, str(NO_IGNORE_LAUNCHER), "-c", str(cfg_path)]
    proc = ManagedProcess(f"synapse-{mode}", argv, workdir / "synapse.log", cwd=workdir)
    return SynapseServer(mode, f"http://127.0.0.1:{port}", shared_secret, proc)


def wait_synapse(server: SynapseServer, timeout: float = 90.0) -> None:
    server.process.wait_http(f"{server.url}/_matrix/client/versions", timeout)


async def register_appservice_user(
    client: httpx.AsyncClient, server: SynapseServer, localpart: str
) -> str:
    """Register `@<localpart>` in the appservice's namespace; the user ID."""
    resp = await client.post(
        f"{server.url}/_matrix/client/v3/register",
        json={"type": "m.login.application_service", "username": localpart},
        headers={"Authorization": f"Bearer {APPSERVICE_TOKEN}"},
    )
    if resp.status_code != 200:
        raise RuntimeError(f"registering {localpart}: {resp.status_code} {resp.text}")
    user_id: str = resp.json()["user_id"]
    return user_id


@dataclass(frozen=True)
class RegisteredUser:
    user_id: str
    localpart: str
    password: str
    access_token: str
    device_id: str


async def register_user(
    client: httpx.AsyncClient, server: SynapseServer, localpart: str, admin: bool = False
) -> RegisteredUser:
    """Shared-secret registration through ``/_synapse/admin/v1/register`` (HMAC nonce flow)."""
    url = f"{server.url}/_synapse/admin/v1/register"
    nonce_resp = await client.get(url)
    nonce_resp.raise_for_status()
    nonce: str = nonce_resp.json()["nonce"]
    password = secrets.token_hex(8)
    mac = hmac.new(server.shared_secret.encode(), digestmod=hashlib.sha1)
    mac.update(
        b"\x00".join(
            [
                nonce.encode(),
                localpart.encode(),
                password.encode(),
                b"admin" if admin else b"notadmin",
            ]
        )
    )
    resp = await client.post(
        url,
        json={
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        },
    )
    if resp.status_code != 200:
        raise RuntimeError(f"registering {localpart}: {resp.status_code} {resp.text}")
    body = resp.json()
    return RegisteredUser(
        user_id=body["user_id"],
        localpart=localpart,
        password=password,
        access_token=body["access_token"],
        device_id=body["device_id"],
    )
