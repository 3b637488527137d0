"""`blink keys`: add, list and revoke API keys in a keys file (gateway/keys.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blink.config import (
    TenantLimits,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger("blink")


def add_keys_parser(sub: Any) -> None:
    keys = sub.add_parser(
        "keys",
        help="add, list and revoke API keys (each names a tenant and its limits)",
        description="Manage the API keys file that `blink serve --api-keys FILE` (or BLINK_API_KEYS) reads. Only a "
        "salted hash of each key is stored; `add` prints the key once, alone on its last line. A running server "
        "sees every change at once.",
    )
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="create a key for TENANT (and set the tenant's limits given)")
    add.add_argument("tenant", metavar="TENANT", help="the tenant's name: 1-64 letters, digits, '.', '_', '-'")
    add.add_argument("--admin", action="store_true", help="the key may act for every tenant (cache invalidation)")
    for f in dataclasses.fields(TenantLimits):
        add.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=None,
            metavar="N",
            help=f"{f.metadata['help']} (0: no limit; default {f.default}, or the file's `defaults`)",
        )
    actions.add_parser("list", help="list the keys: id, tenant, admin, created, the tenant's limits")
    revoke = actions.add_parser("revoke", help="remove a key (by its id, or the key itself)")
    revoke.add_argument("key_id", metavar="KEY_ID")
    for parser in (add, *actions.choices.values()):
        if not any(a.dest == "file" for a in parser._actions):
            parser.add_argument("--file", type=Path, default=None, help="the keys file (default: $BLINK_API_KEYS)")


def keys_command(args: argparse.Namespace) -> int:
    from blink.gateway.keys import KeyFile

    path = args.file or os.environ.get("BLINK_API_KEYS")
    if not path:
        print("blink keys: name the keys file with --file FILE (or BLINK_API_KEYS)", file=sys.stderr)
        return 2
    try:
        keys = KeyFile(Path(path))
        if args.action == "add":
            limits = {f.name: getattr(args, f.name) for f in dataclasses.fields(TenantLimits)}
            key_id, key = keys.add(
                args.tenant, admin=args.admin, limits={k: v for k, v in limits.items() if v is not None}
            )
            print(f"added key {key_id} for tenant {args.tenant!r} to {path}; the key (shown only now):")
            print(key)
        elif args.action == "list":
            for entry in keys.list():
                print(json.dumps(entry))
        elif not keys.revoke(args.key_id):
            print(f"blink keys: no key {args.key_id!r} in {path}", file=sys.stderr)
            return 1
        else:
            print(f"revoked {args.key_id}")
    except ValueError as exc:
        print(f"blink keys: {exc}", file=sys.stderr)
        return 2
    return 0
