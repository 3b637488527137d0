"""Failover on the Redis bus: a live replica takes over what a dead replica of its pool had taken and not finished.

A replica's requests in flight are the pending entries of its consumer (named by its replica_id) in the pool's
group. A consumer counts as dead when its replica's heartbeat in P:replicas is missing (never sent, or expired),
older than heartbeat_timeout, or says STOPPED; a heartbeat we cannot parse (a newer replica's) counts as alive, so
that a rolling upgrade never robs a live replica. Only a replica whose own heartbeat is fresh and READY claims.

Per dead consumer one script moves up to the claimer's room of its entries to the claimer and deletes the consumer
once it holds none (consumers are per-process ids and would pile up). A dead replica's direct stream (requests the
gateways routed to it by prefix affinity) is emptied first by another script: what the dead consumer held there,
then what it never read, move to the claimer's own direct stream (so a later failover of the claimer finds them
in its stream); the stream is deleted once empty, and only then the consumer (so it is found again until its
direct stream is gone; a submit to a deleted direct stream goes to the pool). The scripts check the owner and
claim in one step, so of two replicas racing for an entry exactly one gets it: the other's script finds it no
longer pending for the dead consumer and returns nothing.

Not fenced: a replica that was only frozen past heartbeat_timeout (not killed) and then resumes still publishes
into the response while its request's state is open, alongside the replica that took it over.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import redis.asyncio as aioredis

from blink.bus.messages import ReplicaState, ReplicaStatus
from blink.bus.redis_wire import FIELD, GROUP, Entries, Keys, parse

log = logging.getLogger("blink.bus")

# KEYS: pool, the dead consumer's direct stream. ARGV: group, dead consumer, claiming consumer, count. Returns the
# claimed entries as XCLAIM does (one whose stream entry is gone is dropped from the pending list and not returned,
# Redis >= 7.0).
_CLAIM = """
local claimed = {}
if tonumber(ARGV[4]) > 0 then
  local ids = {}
  for i, p in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', ARGV[4], ARGV[2])) do ids[i] = p[1] end
  if #ids > 0 then claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, unpack(ids)) end
end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return claimed
"""

# KEYS: the dead consumer's direct stream, the claimer's. ARGV: group, dead consumer, claiming consumer, count.
# Moves what the dead consumer held there, then what it never read, up to count in all, to the end of the claimer's
# own direct stream (new entries the claimer reads as any; none stays pending in a stream not its own, so a chain
# of failovers always finds them); deletes the dead one's stream once empty. Returns how many moved.
_CLAIM_DIRECT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local found = {}
local n = tonumber(ARGV[4])
if n > 0 then
  local ids = {}
  for i, p in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', n, ARGV[2])) do ids[i] = p[1] end
  if #ids > 0 then found = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, unpack(ids)) end
  if n > #found then
    local fresh = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[3], 'COUNT', n - #found, 'STREAMS', KEYS[1], '>')
    if fresh then
      for _, entry in ipairs(fresh[1][2]) do found[#found + 1] = entry end
    end
  end
end
for _, entry in ipairs(found) do
  redis.call('XADD', KEYS[2], '*', unpack(entry[2]))
  redis.call('XACK', KEYS[1], ARGV[1], entry[1])
  redis.call('XDEL', KEYS[1], entry[1])
end
if redis.call('XLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
return #found
"""


class Claimer:
    """Finds the dead consumers of a pool's group and claims their pending requests for a live replica."""

    def __init__(self, client: aioredis.Redis, keys: Keys, heartbeat_timeout: float, interval_s: float) -> None:
        self._client = client
        self._keys = keys
        self.heartbeat_timeout = heartbeat_timeout
        self.interval_s = interval_s  # how often a replica looks (its receive calls this at most that often)
        self._script = client.register_script(_CLAIM)
        self._direct_script = client.register_script(_CLAIM_DIRECT)

    async def claim(self, model: str, me: str, room: int) -> dict[str, list[tuple[str, Entries]]]:
        """Entries of `model`'s pool and dead replicas' direct streams claimed for consumer `me`, by the dead
        consumer they came from, as (stream, entries): at most `room` in all (0: only delete the dead consumers
        that hold nothing and their empty direct streams). Nothing unless `me` itself is alive and READY. The
        caller owns what comes back (it is pending for `me`): it must deliver or acknowledge it."""
        pool = self._keys.pool(model)
        consumers = await self._client.xinfo_consumers(pool, GROUP)
        others = [str(c["name"]) for c in consumers if c["name"] != me]
        if not others:
            return {}
        beats = cast(list[str | None], await self._client.hmget(self._keys.replicas, [me, *others]))
        mine = self._status(beats[0])
        if mine is None or mine.state is not ReplicaState.READY or not self._fresh(mine):
            return {}
        out: dict[str, list[tuple[str, Entries]]] = {}
        for name, beat in zip(others, beats[1:], strict=True):
            if not self._dead(beat):
                continue
            direct = self._keys.direct(model, name)
            keys = [direct, self._keys.direct(model, me)]
            moved = int(await self._direct_script(keys=keys, args=[GROUP, name, me, room]))
            if moved:
                room -= moved
                log.info("bus: replica %s took over %d routed request(s) of dead replica %s", me, moved, name)
            reply = cast(list[Any], await self._script(keys=[pool, direct], args=[GROUP, name, me, room]))
            found: Entries = [
                (str(entry_id), dict(zip(flat[::2], flat[1::2], strict=True))) for entry_id, flat in reply
            ]
            room -= len(found)
            if found:
                out.setdefault(name, []).append((pool, found))
        return out

    def _dead(self, beat: str | None) -> bool:
        if beat is None:
            return True
        status = self._status(beat)
        if status is None:  # a heartbeat we cannot read (a newer replica's): not ours to judge
            return False
        return status.state is ReplicaState.STOPPED or not self._fresh(status)

    def _fresh(self, status: ReplicaStatus) -> bool:
        return time.time() - status.sent <= self.heartbeat_timeout

    @staticmethod
    def _status(beat: str | None) -> ReplicaStatus | None:
        if beat is None:
            return None
        try:
            return cast(ReplicaStatus, parse({FIELD: beat}, (ReplicaStatus,)))
        except ValueError:
            return None
