"""A realtime response's prompt, decided here: the session's instructions, the chunks retrieval picks (ordered by
document and position, not score), the conversation, then the user's message. The pre-load (preload/planner.py)
builds its prompt the same way for the predicted message, so at response.create the prompt finds those blocks
in the prefix cache (which compares tokens, never assumes: the KV is reused only if the chunks are the same).
The chat template itself is applied on the replica (models/tokenizer.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from blink.bus.messages import GenerateRequest, Sampling
from blink.gateway.realtime.settings import SessionSettings
from blink.preload.planner import Messages, PreloadDeferred, Target
from blink.preload.store import ContextStore, ScoredChunk, context_block

if TYPE_CHECKING:
    from blink.gateway.generation import Generation
    from blink.gateway.keys import Tenant
    from blink.gateway.service import Gateway

PRELOAD_PRIORITY = 1  # background: below every live request


class SessionState(Protocol):
    id: str
    settings: SessionSettings
    open_documents: tuple[str, ...]


@dataclass(frozen=True)
class Prompt:
    messages: Messages
    documents: str  # the retrieved chunks as the prompt shows them ("" for none)
    history: Messages  # the conversation before the user's message
    user: str | None  # the user's message, when the conversation ends with one
    retrieval_ms: float


class Prompter:
    def __init__(self, gateway: Gateway, tenant: Tenant, session: SessionState) -> None:
        self.gateway, self.tenant, self.session = gateway, tenant, session

    def documents(self) -> ContextStore:
        assert self.gateway.store is not None
        limits = self.tenant.limits
        return self.gateway.store.of(self.tenant.name, limits.max_documents, limits.max_document_bytes)

    async def retrieve(self, query: str) -> list[ScoredChunk]:
        retrieval = self.session.settings.retrieval
        if retrieval is None or self.gateway.store is None:
            return []
        ids = retrieval.document_ids or self.session.open_documents or None
        return await self.documents().search(query, retrieval.top_k, list(ids) if ids else None)

    def compose(self, documents: str, history: Messages, user: str | None) -> Messages:
        """system instructions + retrieved chunks (`documents`: their context_block, "" for none), then the
        conversation, then the user's message."""
        system = self.session.settings.instructions or ""
        if documents:
            system = (system + "\n\n" if system else "") + "Documents:\n\n" + documents
        head = ({"role": "system", "content": system},) if system else ()
        tail = ({"role": "user", "content": user},) if user is not None else ()
        return (*head, *history, *tail)

    async def build(self, conversation: Messages) -> Prompt:
        """The prompt for a response to `conversation`, retrieving for its last user message."""
        started = time.monotonic()
        *before, last = conversation
        user = last["content"] if last["role"] == "user" else None
        query = user or next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")
        documents = context_block(await self.retrieve(query))
        history = tuple(before) if user is not None else conversation
        retrieval_ms = round((time.monotonic() - started) * 1000, 3)
        return Prompt(self.compose(documents, history, user), documents, history, user, retrieval_ms)

    # the pre-load planner's hooks --------------------------------------------------------------------
    def _defer_while_live(self) -> None:
        if self.gateway.num_live:
            # a pre-load's CPU work (retrieval's embedding, tokenizing, its own prompt chunk in each step) runs on
            # the cores live streams decode on: measured, four typing sessions raised a live stream's p99
            # inter-token latency 1.6x even with the engine's background budget; so it waits for them
            raise PreloadDeferred("live responses are streaming")

    async def preload_context(self, text: str) -> str:
        """The planner's context of a draft: the chunks retrieval picks for it, rendered ("" without retrieval)."""
        self._defer_while_live()
        return context_block(await self.retrieve(text))

    async def start_preload(self, target: Target) -> Generation:
        self._defer_while_live()
        assert isinstance(target.context, str)
        request = GenerateRequest(
            self.gateway.new_id("preload"),
            self.session.settings.model,
            Sampling(max_tokens=1, temperature=0),
            messages=self.compose(target.context, target.messages, target.text),
            deadline=time.time() + self.gateway.config.preload_ttl_s,
            session_id=self.session.id,
            priority=PRELOAD_PRIORITY,
            prefill_only=True,
            open_last=True,
        )
        return await self.gateway.generate(request, tenant=self.tenant)  # its KV in the tenant's partition
