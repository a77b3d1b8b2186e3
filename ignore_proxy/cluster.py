"""Several instances (replicas) in front of one homeserver: list changes shared through
Redis pub/sub (`cluster.redis_url`), as sibling workers share them over `workers.py`'s
local channel.

An instance whose user's list changes (a write through it, or new account data in a
/sync it read) publishes the user ID, and nothing else, on `cluster.channel`; a write's
answer waits, at most `cluster.publish_timeout`, for Redis to accept it. Every instance
(every worker of each) is subscribed and forgets that user's list, which is read again on
the user's next request. Its own message comes back to it too: one read more per write.

Pub/sub delivers a message to whoever is subscribed when it is published and to nobody
later. So the instance holds its lists for `ignore.list_ttl` only while it knows it hears
everything: its subscription confirmed and answering a PING within a few seconds of
silence, and its own publishes accepted. Otherwise (Redis down, unreachable, a connection
dropped or silent, a publish failed or not accepted in time) it keeps serving, re-reads
every list after `cluster.fallback_list_ttl`, says so once in the log, in
`/_ignore_proxy/health/ready` and in `ignore_proxy_cluster_redis_up`, keeps reconnecting
and publishes again what was not accepted. When it is subscribed again it forgets every
list it holds: what was published meanwhile never reached it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .config import Cluster
from .ids import is_user_id
from .ignore_lists import IgnoreListStore

__all__ = ["ClusterChannel"]

log = logging.getLogger(__name__)

# Silence on the subscription longer than this brings a PING; no answer within as long
# again means the connection is dead (a peer gone without a FIN, a NAT that forgot it).
_HEARTBEAT = 1.0
_CONNECT_TIMEOUT = 2.0
_COMMAND_TIMEOUT = 2.0
_RECONNECT_DELAYS = (0.2, 0.5, 1.0, 2.0)


class _Silent(Exception):
    """The subscription stopped answering."""


class ClusterChannel:
    """This process's end of the instances' channel: publishes its changes, forgets the
    lists others changed, and shortens every list's life while it may miss a change."""

    def __init__(self, settings: Cluster, ignore_lists: IgnoreListStore) -> None:
        self._settings = settings
        self._lists = ignore_lists
        self._channel = settings.channel.encode()
        # The subscriber must not reconnect behind our back: a silent resubscription
        # loses what was published in between. Errors come to `_listen` instead.
        self._subscriber = Redis.from_url(
            settings.redis_url,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=_CONNECT_TIMEOUT,
            socket_timeout=_COMMAND_TIMEOUT,
            socket_keepalive=True,
        )
        # A pooled connection may have died with a restarted Redis: one retry reconnects.
        self._publisher = Redis.from_url(
            settings.redis_url,
            retry=Retry(NoBackoff(), 1),
            socket_connect_timeout=_CONNECT_TIMEOUT,
            socket_timeout=_COMMAND_TIMEOUT,
        )
        self._publishing: dict[str, asyncio.Task[None]] = {}
        self._unsent: set[str] = set()  # publishes failed or not accepted in time
        self._subscribed = False
        self._healthy = True  # as last applied to the store; the first `_update` says down
        self._warned = False  # the outage was logged (once an outage)
        self._heard_since_connect = False
        self._down_since: float | None = None
        self._reason = "not connected yet"
        self._listener: asyncio.Task[None] | None = None
        self.published = 0  # publishes Redis accepted
        self.publish_failures = 0
        self.publishes_late = 0  # not accepted within publish_timeout: the answer went
        self.heard = 0  # changes heard from the channel (ours included)
        self.resubscriptions = 0  # times every list was forgotten on (re)subscribing

    @property
    def up(self) -> bool:
        """Whether this process hears every change and its own are accepted."""
        return self._healthy

    async def start(self) -> None:
        self._lists.on_change.append(self.changed)
        self._lists.wait_shared = self.wait_shared
        self._update()  # down until the subscription is confirmed: short-lived lists
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def stop(self) -> None:
        tasks = [*self._publishing.values()]
        if self._listener is not None:
            self._listener.cancel()
            tasks.append(self._listener)
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._subscriber.aclose()
        await self._publisher.aclose()

    def state(self) -> dict[str, Any]:
        """For the readiness answer: whether Redis carries the changes, and if not since
        when and how long lists live meanwhile."""
        if self._healthy:
            return {"redis": "connected"}
        since = self._down_since if self._down_since is not None else time.time()
        return {
            "redis": "unavailable",
            "reason": self._reason,
            "down_seconds": round(time.time() - since, 1),
            "list_ttl": self._settings.fallback_list_ttl,
        }

    # -- publishing ---------------------------------------------------------------------------

    def changed(self, user_id: str) -> None:
        """A user's list changed here: tell the others (the store calls this)."""
        task = asyncio.get_running_loop().create_task(self._publish(user_id))
        self._publishing[user_id] = task
        task.add_done_callback(lambda done: self._published(user_id, done))

    async def wait_shared(self, user_id: str) -> None:
        """Before a write's answer leaves: wait, bounded, for Redis to accept the change."""
        task = self._publishing.get(user_id)
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=self._settings.publish_timeout)
        if not done:
            # The answer goes; until Redis takes it (retried) this process may be cut off
            # too, and its lists are short-lived.
            self.publishes_late += 1
            self._unsent.add(user_id)
            self._update("a change's message was not accepted in time")

    async def _publish(self, user_id: str) -> None:
        try:
            await self._publisher.publish(self._channel, user_id.encode("utf-8", "surrogatepass"))
        except Exception as exc:  # any failure: the message is sent again later
            self.publish_failures += 1
            self._unsent.add(user_id)
            self._update(f"publishing failed: {type(exc).__name__}")
            return
        self.published += 1
        self._unsent.discard(user_id)
        self._update()

    def _published(self, user_id: str, task: asyncio.Task[None]) -> None:
        if self._publishing.get(user_id) is task:
            del self._publishing[user_id]

    def _send_unsent(self) -> None:
        for user_id in list(self._unsent):
            if user_id not in self._publishing:
                self.changed(user_id)

    # -- hearing ------------------------------------------------------------------------------

    async def _listen(self) -> None:
        failures = 0
        while True:
            try:
                await self._hear()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever broke, the subscription is gone
                reason = f"subscription lost: {type(exc).__name__}"
            self._subscribed = False
            self._update(reason)
            if self._heard_since_connect:
                failures = 0
            await asyncio.sleep(_RECONNECT_DELAYS[min(failures, len(_RECONNECT_DELAYS) - 1)])
            failures += 1

    async def _hear(self) -> None:
        self._heard_since_connect = False
        pubsub = self._subscriber.pubsub()
        try:
            await pubsub.subscribe(self._channel)
            await self._confirmed(pubsub)
            # A write's publish should not wait for a connection to be made.
            with contextlib.suppress(Exception):
                await self._publisher.ping()
            # Whatever was published before this point never reached this process.
            self._lists.forget_all()
            self.resubscriptions += 1
            self._subscribed = True
            self._heard_since_connect = True
            self._update()
            await self._receive(pubsub)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _confirmed(self, pubsub: PubSub) -> None:
        deadline = asyncio.get_running_loop().time() + _COMMAND_TIMEOUT
        while asyncio.get_running_loop().time() < deadline:
            message = await pubsub.get_message(timeout=_HEARTBEAT)
            if message is not None and message["type"] == "subscribe":
                return
        raise _Silent

    async def _receive(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        last_heard = loop.time()
        pinged_at: float | None = None
        while True:
            message = await pubsub.get_message(timeout=_HEARTBEAT)
            now = loop.time()
            if message is not None:
                last_heard = now
                if message["type"] == "message":
                    self._forget(message["data"])
                elif message["type"] == "pong":
                    pinged_at = None
            if pinged_at is not None and now - pinged_at > _HEARTBEAT:
                raise _Silent
            if pinged_at is None and now - last_heard >= _HEARTBEAT:
                await pubsub.ping()
                pinged_at = now
            self._send_unsent()

    def _forget(self, data: object) -> None:
        self.heard += 1
        try:
            user_id = data.decode("utf-8", "surrogatepass") if isinstance(data, bytes) else ""
        except UnicodeDecodeError:
            user_id = ""
        if is_user_id(user_id):
            self._lists.forget(user_id)
            return
        # Not a user ID (something else publishes on the channel): it may have meant
        # anyone, so everyone's list is read again.
        log.warning("cluster: a message on the channel is not a user ID; forgetting every list")
        self._lists.forget_all()

    # -- state --------------------------------------------------------------------------------

    def _update(self, reason: str | None = None) -> None:
        """Apply whether this process hears every change; `reason`: what just failed."""
        if reason is not None:
            self._reason = reason
        healthy = self._subscribed and not self._unsent
        if healthy != self._healthy:
            self._healthy = healthy
            if healthy:
                self._down_since = None
                self._lists.limit_freshness(None)
                self._warned = False
                log.info("cluster: list changes shared through Redis")
            else:
                self._down_since = time.time()
                self._lists.limit_freshness(self._settings.fallback_list_ttl)
        if not healthy and reason is not None and not self._warned:
            self._warned = True  # retries every second or two: one line an outage
            log.warning(
                "cluster: Redis unavailable or slow (%s); ignore lists are read again after "
                "%g s until it is back",
                self._reason,
                self._settings.fallback_list_ttl,
            )
