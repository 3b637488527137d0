"""API keys and tenants: who a request belongs to, and the limits that tenant runs under.

    keys = KeyFile(path)                    # the keys file (JSON), re-read whenever it changes on disk
    tenant = keys.authenticate(key)         # the key's Tenant; AuthenticationError (401 invalid_api_key) otherwise
    key = keys.add("acme", limits={...})    # a new key: returned once, only its salted hash is stored

A key reads `bk-<id>-<secret>`: the id finds its entry, the secret is checked against the entry's salted SHA-256 in
constant time. The secret is 24 random bytes, so a fast hash is enough (slow KDFs protect guessable passwords) and
a check costs microseconds. Keys are never logged; `list` shows ids, tenants and limits, never hashes.

The file: {"version": 1, "defaults": {limit: value}, "tenants": {name: {limit: value}}, "keys": [{id, tenant,
salt, hash, admin, created}]}. A tenant's limits are TenantLimits' defaults, overridden by the file's `defaults`,
then by the tenant's own. Writes go to a temporary file renamed over the old one (mode 0600), so a reader never
sees half a file; a file that does not parse keeps the last good table in force (and says so in the log).

Without a keys file the server is open (`OpenAccess`): every request, with any key or none, is the one tenant
"default", without limits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from blink.config import TenantLimits
from blink.errors import AuthenticationError

log = logging.getLogger("blink.gateway.keys")

OPEN_TENANT = "default"
TENANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_KEY = re.compile(r"bk-([0-9a-f]{12})-([0-9a-f]{48})")
LIMIT_NAMES = tuple(f.name for f in dataclasses.fields(TenantLimits))


@dataclass(frozen=True)
class Tenant:
    name: str
    limits: TenantLimits
    admin: bool = False  # may act for every tenant (e.g. DELETE /v1/cache?all_tenants=true)


class Authenticator(Protocol):
    keyed: bool  # False: an open server (any key is the one tenant)

    def authenticate(self, key: str | None) -> Tenant:
        """The tenant of `key`; AuthenticationError if the key is missing or unknown."""
        ...

    def tenants(self) -> list[str]:
        """Every tenant's name."""
        ...

    def tenant_named(self, name: str) -> Tenant | None:
        """The tenant called `name` (an edge's link asserts it for each request it forwards); None: no such tenant."""
        ...


# an open server's one tenant: no rates or concurrency to share out, but what it stores stays bounded
OPEN_LIMITS = dataclasses.replace(
    TenantLimits.unlimited(),
    **{
        name: getattr(TenantLimits(), name)
        for name in ("max_session_items", "max_session_bytes", "max_documents", "max_document_bytes")
    },
)


class OpenAccess:
    """No keys configured: every client is the one tenant (an open server is for loopback), under OPEN_LIMITS."""

    keyed = False

    def __init__(self) -> None:
        self.tenant = Tenant(OPEN_TENANT, OPEN_LIMITS, admin=True)

    def authenticate(self, key: str | None) -> Tenant:
        return self.tenant

    def tenants(self) -> list[str]:
        return [self.tenant.name]

    def tenant_named(self, name: str) -> Tenant | None:
        """An edge's tenant, kept apart by name (its prefix-cache partition, its sessions), under OPEN_LIMITS."""
        return Tenant(name, OPEN_LIMITS) if TENANT_NAME.fullmatch(name) else None


def _limits(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object of limits")
    unknown = sorted(set(raw) - set(LIMIT_NAMES))
    if unknown:
        raise ValueError(f"{where}: unknown limit(s) {', '.join(unknown)}; known: {', '.join(LIMIT_NAMES)}")
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{where}.{name} must be a number >= 0 (0: no limit)")
    return raw


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


@dataclass(frozen=True)
class _Entry:
    tenant: str
    salt: str
    hash: str
    admin: bool


class KeyFile:
    """The keys file at `path`. `authenticate` re-reads it when its size, inode or mtime changed (one stat per
    call), so `blink keys add/revoke` take effect at once on a running server."""

    keyed = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._entries: dict[str, _Entry] = {}
        self._tenants: dict[str, Tenant] = {}
        self._reload(first=True)

    # reading ------------------------------------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"version": 1, "defaults": {}, "tenants": {}, "keys": []}
        raw = json.loads(self.path.read_text())
        if not isinstance(raw, dict) or not isinstance(raw.get("keys", []), list):
            raise ValueError("expected an object with a list 'keys'")
        return raw

    def _reload(self, first: bool = False) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        if stamp == self._stamp:
            return
        try:
            raw = self._read()
            entries, tenants = self._parse(raw)
        except (ValueError, OSError) as exc:
            if first:
                raise ValueError(f"API keys file {self.path}: {exc}") from None
            log.error("API keys file %s: %s; the keys read before stay in force", self.path, exc)
            self._stamp = stamp  # said once per change of the file
            return
        self._stamp, self._entries, self._tenants = stamp, entries, tenants
        if not first:
            log.info("API keys file %s re-read: %d key(s), %d tenant(s)", self.path, len(entries), len(tenants))

    def _parse(self, raw: dict[str, Any]) -> tuple[dict[str, _Entry], dict[str, Tenant]]:
        defaults = _limits(raw.get("defaults", {}), "defaults")
        per_tenant = raw.get("tenants", {})
        if not isinstance(per_tenant, dict):
            raise ValueError("'tenants' must be an object")
        entries: dict[str, _Entry] = {}
        for i, item in enumerate(raw.get("keys", [])):
            try:
                entry = _Entry(str(item["tenant"]), str(item["salt"]), str(item["hash"]), bool(item.get("admin")))
                entries[str(item["id"])] = entry
            except (KeyError, TypeError) as exc:
                raise ValueError(f"keys[{i}] lacks {exc}") from None
        tenants = {}
        for name in {e.tenant for e in entries.values()} | set(per_tenant):
            own = _limits(per_tenant.get(name, {}), f"tenants.{name}")
            tenants[name] = Tenant(name, TenantLimits(**{**defaults, **own}))
        return entries, tenants

    # checking -----------------------------------------------------------------------------------------
    def authenticate(self, key: str | None) -> Tenant:
        self._reload()
        match = _KEY.fullmatch(key or "")
        entry = self._entries.get(match.group(1)) if match else None
        if match is None or entry is None or not hmac.compare_digest(entry.hash, _digest(entry.salt, match.group(2))):
            if not key:
                raise AuthenticationError(
                    "no API key: send 'Authorization: Bearer <key>' (browsers: the WebSocket subprotocol "
                    "'openai-insecure-api-key.<key>')"
                )
            raise AuthenticationError("invalid API key")
        tenant = self._tenants[entry.tenant]
        return dataclasses.replace(tenant, admin=True) if entry.admin else tenant

    def tenants(self) -> list[str]:
        self._reload()
        return sorted(self._tenants)

    def tenant_named(self, name: str) -> Tenant | None:
        self._reload()
        return self._tenants.get(name)

    # managing (`blink keys`) --------------------------------------------------------------------------
    def add(self, tenant: str, *, admin: bool = False, limits: dict[str, Any] | None = None) -> tuple[str, str]:
        """Create a key for `tenant` (setting the given limits of the tenant); returns (key id, key). The key is
        not stored: only its salted hash."""
        if not TENANT_NAME.fullmatch(tenant):
            raise ValueError("a tenant name is 1-64 letters, digits, '.', '_' or '-'")
        raw = self._read()
        key_id, secret, salt = secrets.token_hex(6), secrets.token_hex(24), secrets.token_hex(16)
        raw.setdefault("keys", []).append(
            {
                "id": key_id,
                "tenant": tenant,
                "salt": salt,
                "hash": _digest(salt, secret),
                "admin": admin,
                "created": int(time.time()),
            }
        )
        if limits:
            own = raw.setdefault("tenants", {}).setdefault(tenant, {})
            own.update(_limits(limits, f"tenants.{tenant}"))
        self._write(raw)
        return key_id, f"bk-{key_id}-{secret}"

    def list(self) -> list[dict[str, Any]]:
        """Each key's id, tenant, admin flag, creation time and its tenant's limits (never the hash)."""
        raw = self._read()
        _, tenants = self._parse(raw)
        return [
            {
                "id": item["id"],
                "tenant": item["tenant"],
                "admin": bool(item.get("admin")),
                "created": item.get("created"),
                "limits": dataclasses.asdict(tenants[item["tenant"]].limits),
            }
            for item in raw.get("keys", [])
        ]

    def revoke(self, key_id: str) -> bool:
        """Remove the key with this id (or the whole key); False if there is none."""
        match = _KEY.fullmatch(key_id)
        key_id = match.group(1) if match else key_id
        raw = self._read()
        keys = raw.get("keys", [])
        kept = [k for k in keys if k.get("id") != key_id]
        if len(kept) == len(keys):
            return False
        raw["keys"] = kept
        self._write(raw)
        return True

    def _write(self, raw: dict[str, Any]) -> None:
        raw["version"] = 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(raw, f, indent=2)
                f.write("\n")
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
