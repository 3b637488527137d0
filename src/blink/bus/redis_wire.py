"""What the Redis bus's two sides share: key names, the entry format, how an outage is handled, and how every
Redis client of blink is made (the bus, the session store and the semantic cache use `client` and `redact`).

URLs: redis://, rediss:// (TLS; redis-py's ssl_* options ride in the query, e.g. ?ssl_ca_certs=/ca.pem) and
unix://. The password comes from the environment (cli.py: BLINK_REDIS_PASSWORD or REDIS_PASSWORD), so it is not
in any process's argv; one in the URL still works, and wins. A URL is shown only through `redact`; what reaches a
client never names the Redis at all.

Keys, for a prefix P (default blink:bus); every stream entry is {"m": JSON of messages.to_dict}:
    P:pool:<model>    GenerateRequests; one consumer group ("replicas"), each replica a consumer named by its
                      replica_id. A request is XACKed and XDELed together when its replica publishes its Finished,
                      so the stream holds the undelivered backlog plus the requests replicas hold (their pending
                      entries, which a failover XCLAIMs from a dead replica): backlog = XLEN - pending.
    P:cancel:<model>  Cancels, read by every replica of the pool from the last id it saw (a broadcast); about
                      CANCEL_KEEP entries are kept
    P:resp:<id>       one request's events in order; entry ids increase, so an id is a resume point. The reader
                      deletes what it consumed, so XLEN is its unread backlog. Expires response_ttl_s after a write.
    P:state:<id>      "open" from submit until no more events are wanted: "finished" (Finished written), "overflow"
                      or "closed" (the reader closed); publish returns False unless it is open. Expires
                      response_ttl_s after a write, so a response nobody wrote to for that long is no longer open.
    P:replicas        hash replica_id -> its latest ReplicaStatus; a field expires 2 x heartbeat_timeout after it
                      was written (HPEXPIRE, Redis >= 7.4)
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from blink.bus import messages
from blink.bus.messages import Finished, FinishStatus

log = logging.getLogger("blink.bus")

GROUP = "replicas"
FIELD = "m"
CANCEL_KEEP = 1000  # cancels kept per pool; a replica that stalls this many cancels behind misses the oldest
BACKOFF_S = (0.05, 2.0)  # first and longest wait between tries while Redis is unreachable
ERRORS = (RedisError, OSError)  # OSError covers the builtin ConnectionError and TimeoutError asyncio raises

Entries = list[tuple[str, dict[str, str] | None]]  # (entry id, fields); fields None: the entry was deleted


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.replicas = f"{prefix}:replicas"

    def pool(self, model: str) -> str:
        return f"{self.prefix}:pool:{model}"

    def direct(self, model: str, replica_id: str) -> str:
        """The requests sent to one replica of the pool (it holds their prefix); same group as the pool."""
        return f"{self.prefix}:direct:{model}:{replica_id}"

    def cancels(self, model: str) -> str:
        return f"{self.prefix}:cancel:{model}"

    def resp(self, request_id: str) -> str:
        return f"{self.prefix}:resp:{request_id}"

    def state(self, request_id: str) -> str:
        return f"{self.prefix}:state:{request_id}"


def client(url: str, password: str | None = None, **options: Any) -> aioredis.Redis:
    """A client of the Redis at `url` (see the module's docstring), authenticated with `password` unless the URL
    carries its own (redis-py lets the URL's win). `options`: redis-py's (timeouts, retry, decode_responses)."""
    return aioredis.Redis.from_url(url, password=password or None, **options)


def check_url(url: str) -> str:
    """`url` if blink can connect with it (the scheme redis://, rediss:// or unix://, a numeric port, known query
    options well-formed); ValueError otherwise, naming the URL only as `redact` writes it."""
    try:
        if urlsplit(url).scheme.lower() in ("redis", "rediss", "unix"):
            parse_url(url)
            return url
        why = "it must start with redis://, rediss:// or unix://"
    except ValueError as exc:
        why = _reason(exc)
    raise ValueError(f"{redact(url)} is not a Redis URL: {why}")


def _reason(exc: ValueError) -> str:
    """What was wrong, without the value (urllib quotes the offending part, which may hold the password)."""
    text = str(exc)
    if "port" in text.lower():
        return "its port is not a number from 0 to 65535"
    if "Invalid value for" in text:
        return text  # redis-py names the option, not its value
    return "it cannot be parsed"


def blocking_client(url: str, password: str | None, connect_timeout_s: float) -> aioredis.Redis:
    """A client for blocking reads: no socket timeout (each call bounds its own wait with asyncio.timeout, which
    drops the connection when it fires) and no retry (a retried blocking read could deliver twice)."""
    return client(
        url,
        password,
        decode_responses=True,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=None,  # explicitly: redis-py's default is 5 s, which would cut longer blocks
        retry=Retry(NoBackoff(), 0),
    )


class Health:
    """Redis reachability as one bus sees it: an outage is logged when it starts and when it ends (a replica's
    loop would otherwise log every step), and callers back off exponentially while it lasts."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.down_since: float | None = None
        self.delay = 0.0
        self.retry_at = 0.0  # monotonic time before which a replica's receive does not try again

    def failed(self, exc: BaseException, doing: str) -> float:
        """Note a failure; returns how long to wait before the next try."""
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            reason = exc or type(exc).__name__
            log.warning("bus: redis at %s is unavailable (%s: %s); retrying", self.where, doing, reason)
        self.delay = min(BACKOFF_S[1], max(BACKOFF_S[0], 2 * self.delay))
        self.retry_at = now + self.delay
        return self.delay

    def ok(self) -> None:
        if self.down_since is not None:
            down = time.monotonic() - self.down_since
            log.info("bus: redis at %s is available again after %.1f s", self.where, down)
            self.down_since, self.delay, self.retry_at = None, 0.0, 0.0


def encode(msg: messages.Message) -> str:
    return json.dumps(messages.to_dict(msg))  # ensure_ascii: lone surrogates survive, as UTF-8 would not carry them


def parse(fields: dict[str, str] | None, kinds: tuple[type[Any], ...]) -> messages.Message:
    """The message of an entry; ValueError unless it is well formed, of one of `kinds`, and not newer than us."""
    text = (fields or {}).get(FIELD)
    if text is None:
        raise ValueError("the entry has no message")
    try:
        msg = messages.from_dict(json.loads(text))
    except (TypeError, KeyError, AttributeError) as exc:  # a dict of the wrong shape (ValueError passes through)
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    if type(msg) not in kinds:
        raise ValueError(f"a {msg.kind} message where {'/'.join(k.kind for k in kinds)} belongs")
    return msg


def entries(reply: object) -> Entries:
    """The entries of an XREAD/XREADGROUP reply on one stream (RESP2: [[key, [(id, fields), ...]]], or empty)."""
    streams = cast(list[tuple[str, Entries]], reply or [])
    return [entry for _, found in streams for entry in found]


def by_stream(reply: object) -> list[tuple[str, Entries]]:
    """The entries of an XREAD/XREADGROUP reply, by stream (RESP2: [[key, [(id, fields), ...]], ...])."""
    return [(str(key), list(found)) for key, found in cast(list[tuple[str, Entries]], reply or [])]


def slow_consumer(request_id: str) -> Finished:
    return Finished(
        request_id,
        FinishStatus.ERROR,
        error_code="slow_consumer",
        error_message="the client read too slowly; the response was cancelled",
    )


def redact(url: str) -> str:
    """The URL with its password (in the authority, or a `password=` query option) written as ***, for logs and
    errors. Clients are never shown a Redis URL, even redacted: it names a host of the deployment."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    except ValueError:
        return "(a Redis URL that cannot be parsed)"
    options = parts.query.split("&") if parts.query else []
    query = "&".join(f"{o.partition('=')[0]}=***" if o.partition("=")[0].lower() == "password" else o for o in options)
    if netloc == parts.netloc and query == parts.query:
        return url
    # by hand: geturl() would write unix:///path as unix:/path
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{query}" if query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )
