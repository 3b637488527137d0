"""A realtime session's conversation: its items in order, kept in the session store (gateway/sessions.py) so a
reconnect (on any gateway of the same Redis) continues it, and held within the tenant's limits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blink.config import TenantLimits
from blink.errors import InvalidRequest, NotFound
from blink.gateway.realtime.events import item_events
from blink.gateway.realtime.protocol import ItemCreate, item_text, message_item
from blink.gateway.sessions import SessionStore
from blink.preload.planner import Messages


class Conversation:
    def __init__(
        self,
        session_id: str,
        items: list[dict[str, Any]],
        store: SessionStore,
        limits: TenantLimits,
        new_id: Callable[[str], str],
    ) -> None:
        self.session_id, self.items = session_id, items
        self._store, self._limits, self._new_id = store, limits, new_id

    @property
    def last_id(self) -> str | None:
        return self.items[-1]["id"] if self.items else None

    def history(self) -> Messages:
        return tuple({"role": i["role"], "content": item_text(i)} for i in self.items)

    def item(self, item_id: str, param: str = "item_id") -> dict[str, Any]:
        found = next((i for i in self.items if i["id"] == item_id), None)
        if found is None:
            raise NotFound(f"no item {item_id!r} in this conversation", param=param, code="item_not_found")
        return found

    async def create(self, event: ItemCreate) -> list[dict[str, Any]]:
        """Add the client's item at the end; its events (conversation.item.added, .done)."""
        previous = self.last_id
        if event.previous_item_id not in (None, previous):
            raise InvalidRequest(
                "items join the end of the conversation: 'previous_item_id' may only name its last item",
                param="previous_item_id",
                code="unsupported_item_position",
            )
        if event.item_id is not None and any(i["id"] == event.item_id for i in self.items):
            raise InvalidRequest(f"the conversation already has an item {event.item_id!r}", param="item.id")
        self._check_room(len(event.text.encode()))
        item = message_item(event.item_id or self._new_id("item"), event.role, event.text)
        await self._store.append_item(self.session_id, item)
        self.items.append(item)
        return item_events(item, previous)

    async def delete(self, item_id: str) -> dict[str, Any]:
        item = self.item(item_id)
        await self._store.delete_item(self.session_id, item_id)
        self.items.remove(item)
        return {"type": "conversation.item.deleted", "item_id": item_id}

    def adopt(self, item: dict[str, Any]) -> None:
        """Hold an item the store already has (an answer another connection of this session stored)."""
        if all(i["id"] != item["id"] for i in self.items):
            self.items.append(item)

    async def remember(self, item: dict[str, Any]) -> None:
        """Add an answer: here and in the store."""
        self.adopt(item)
        await self._store.append_item(self.session_id, item)

    def _check_room(self, size: int) -> None:
        """InvalidRequest conversation_full if an item of `size` bytes would pass the tenant's limits."""
        limits = self._limits
        held = sum(len(item_text(item).encode()) for item in self.items)
        if limits.max_session_items and len(self.items) >= limits.max_session_items:
            raise InvalidRequest(
                f"the conversation holds {len(self.items)} items, this key's limit; start a new session",
                code="conversation_full",
            )
        if limits.max_session_bytes and held + size > limits.max_session_bytes:
            raise InvalidRequest(
                f"the conversation would hold {held + size} bytes of text, over this key's {limits.max_session_bytes};"
                " start a new session",
                code="conversation_full",
            )
