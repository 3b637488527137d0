"""Where realtime sessions live between connections: their settings and conversation, so a client that
reconnects (`/v1/realtime?session_id=...`), possibly to another gateway, continues the same conversation.

    MemorySessions   one gateway's memory (the embedded default): survives reconnects, not restarts
    RedisSessions    Redis (`blink serve --redis`): every gateway on that Redis sees every session

A session belongs to the tenant that created it (its API key's digest): another key neither finds nor changes it.
A session unused for `ttl` seconds is forgotten. Writes are appends (an item) and whole-settings replaces, so two
connections of one session never lose each other's items (their order is the order the store received them).
A session id comes from the client (`?session_id=`): every store refuses one blink could not have given out
(`check_session_id`) before it touches anything, so on Redis a client's id never names another key.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

from blink.errors import InvalidRequest, NotReady

log = logging.getLogger("blink.gateway.sessions")

SESSION_ID = re.compile(r"sess-[0-9a-f]{24}")  # what Gateway.new_id("sess") gives out


def check_session_id(session_id: str) -> str:
    """`session_id` if it has the form of an id blink gives out ('sess-' and 24 lower-case hex digits), else
    InvalidRequest (param session_id; the id is not echoed back: it may be long). The form rules out everything
    that could reach another Redis key (':', '*', spaces, another session's `<id>:items`)."""
    if not isinstance(session_id, str) or SESSION_ID.fullmatch(session_id) is None:  # fullmatch: no trailing \n
        raise InvalidRequest(
            "'session_id' must be a session id as blink gives them out ('sess-' and 24 hex digits)", param="session_id"
        )
    return session_id


@dataclass
class SessionRecord:
    tenant: str
    settings: dict[str, Any]
    items: list[dict[str, Any]] = field(default_factory=list)


class SessionStore(Protocol):
    """Every method raises InvalidRequest for an id `check_session_id` refuses, before it touches anything, and
    NotReady while the store is unreachable."""

    async def create(self, session_id: str, record: SessionRecord) -> None: ...

    async def load(self, session_id: str, tenant: str) -> SessionRecord | None:
        """The session, if it exists and is `tenant`'s; refreshes its lifetime."""
        ...

    async def save_settings(self, session_id: str, settings: dict[str, Any]) -> None: ...

    async def append_item(self, session_id: str, item: dict[str, Any]) -> None: ...

    async def delete_item(self, session_id: str, item_id: str) -> None:
        """Remove the item with id `item_id` from the conversation (nothing if it has none)."""
        ...

    async def close(self) -> None: ...


class MemorySessions:
    def __init__(self, ttl: float, max_sessions: int = 100_000) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._records: OrderedDict[str, tuple[float, SessionRecord]] = OrderedDict()  # least recently used first

    def _get(self, session_id: str) -> SessionRecord | None:
        found = self._records.get(check_session_id(session_id))
        if found is None:
            return None
        used, record = found
        if time.monotonic() - used > self.ttl:
            del self._records[session_id]
            return None
        self._records[session_id] = (time.monotonic(), record)
        self._records.move_to_end(session_id)
        return record

    async def create(self, session_id: str, record: SessionRecord) -> None:
        self._records[check_session_id(session_id)] = (time.monotonic(), record)
        while len(self._records) > self.max_sessions:
            self._records.popitem(last=False)

    async def load(self, session_id: str, tenant: str) -> SessionRecord | None:
        record = self._get(session_id)
        if record is None or record.tenant != tenant:
            return None
        return SessionRecord(record.tenant, dict(record.settings), list(record.items))

    async def save_settings(self, session_id: str, settings: dict[str, Any]) -> None:
        record = self._get(session_id)
        if record is not None:
            record.settings = dict(settings)

    async def append_item(self, session_id: str, item: dict[str, Any]) -> None:
        record = self._get(session_id)
        if record is not None:
            record.items.append(item)

    async def delete_item(self, session_id: str, item_id: str) -> None:
        record = self._get(session_id)
        if record is not None:
            record.items = [i for i in record.items if i.get("id") != item_id]

    async def close(self) -> None:
        self._records.clear()


class RedisSessions:
    """`<prefix>session:<id>`: a hash {tenant, settings (JSON)}; `<prefix>session:<id>:items`: a list of JSON items.
    Both keys expire `ttl` seconds after the last write or load. `url` and `password`: as bus/redis_wire.client.
    Any Redis failure is NotReady, whose message does not name the Redis (the log does, its password masked)."""

    def __init__(self, url: str, ttl: float, prefix: str = "blink:", *, password: str | None = None) -> None:
        from blink.bus.redis_wire import client, redact

        self.ttl = max(1, int(ttl))
        self.prefix = prefix
        self._where = redact(url)
        self._redis = client(url, password, socket_timeout=5, socket_connect_timeout=5)

    def _keys(self, session_id: str) -> tuple[str, str]:
        key = f"{self.prefix}session:{check_session_id(session_id)}"
        return key, key + ":items"

    async def _run(self, build: Any) -> list[Any]:
        import redis

        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                build(pipe)
                result: list[Any] = await pipe.execute()
                return result
        except (redis.RedisError, OSError) as exc:  # RedisError: also a refused AUTH, or an error reply
            log.warning("sessions: redis at %s failed: %s", self._where, exc or type(exc).__name__)
            raise NotReady("the session store is unavailable; retry shortly") from exc

    async def create(self, session_id: str, record: SessionRecord) -> None:
        key, items = self._keys(session_id)

        def build(pipe: Any) -> None:
            pipe.delete(items)
            pipe.hset(key, mapping={"tenant": record.tenant, "settings": json.dumps(record.settings)})
            pipe.expire(key, self.ttl)
            for item in record.items:
                pipe.rpush(items, json.dumps(item))
            pipe.expire(items, self.ttl)

        await self._run(build)

    async def load(self, session_id: str, tenant: str) -> SessionRecord | None:
        key, items = self._keys(session_id)

        def build(pipe: Any) -> None:
            pipe.hgetall(key)
            pipe.lrange(items, 0, -1)
            pipe.expire(key, self.ttl)
            pipe.expire(items, self.ttl)

        fields, raw_items, *_ = await self._run(build)
        if not fields or fields.get(b"tenant", b"").decode() != tenant:
            return None
        settings = json.loads(fields.get(b"settings", b"{}"))
        return SessionRecord(tenant, settings, [json.loads(i) for i in raw_items])

    async def save_settings(self, session_id: str, settings: dict[str, Any]) -> None:
        key, _ = self._keys(session_id)

        def build(pipe: Any) -> None:
            pipe.hset(key, "settings", json.dumps(settings))
            pipe.expire(key, self.ttl)

        await self._run(build)

    async def append_item(self, session_id: str, item: dict[str, Any]) -> None:
        key, items = self._keys(session_id)

        def build(pipe: Any) -> None:
            pipe.rpush(items, json.dumps(item))
            pipe.expire(items, self.ttl)
            pipe.expire(key, self.ttl)

        await self._run(build)

    async def delete_item(self, session_id: str, item_id: str) -> None:
        key, items = self._keys(session_id)
        (raw_items,) = await self._run(lambda pipe: pipe.lrange(items, 0, -1))
        doomed = [raw for raw in raw_items if json.loads(raw).get("id") == item_id]

        def build(pipe: Any) -> None:
            for raw in doomed:  # by value: an item appended meanwhile is not moved or lost
                pipe.lrem(items, 1, raw)
            pipe.expire(items, self.ttl)
            pipe.expire(key, self.ttl)

        await self._run(build)

    async def close(self) -> None:
        await self._redis.aclose()
