"""A realtime response's prompt, decided here: the session's instructions, the chunks retrieval picks (ordered by
document and position, not score), the conversation, then the user's message. The pre-load (preload/planner.py)
builds its prompt the same way for the predicted message, so at response.create the prompt finds those blocks
in the prefix cache (which compares tokens, never assumes: the KV is reused only if the chunks are the same).
The chat template itself is applied on the replica (models/tokenizer.py).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Hashable
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
PREDECODE_PRIORITY = 2  # below pre-loads too: a pre-decode is only worth its tokens once its prompt is in


def sampling_of(settings: SessionSettings) -> Sampling:
    """A response's sampling under the session's (or response's) settings; a pre-decode's is the same."""
    return Sampling(
        max_tokens=settings.max_output_tokens,
        temperature=float(settings.temperature),
        top_p=float(settings.top_p),
        seed=settings.seed,
    )


def predecode_key(model: str, messages: Messages, sampling: Sampling) -> Hashable:
    """What a pre-decode answers: a response with an equal key may adopt it (max_tokens aside)."""
    return model, json.dumps(messages, sort_keys=True), dataclasses.replace(sampling, max_tokens=None)


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
        if self.gateway.num_live and self.session.settings.retrieval is not None and self.gateway.store is not None:
            # retrieval's embedding runs on the cores live streams decode on, in this process: it waits for them.
            # Without retrieval a pre-load costs the gateway little, and the engine keeps its prompt chunks to
            # their turn (engine/scheduler.py), so it goes ahead under load
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

    async def start_predecode(self, messages: Messages, text: str, tokens: int) -> tuple[Generation, Hashable, str]:
        """The predecoder's hook (preload/predecode.py): decode the first `tokens` of the answer to `text`, sent
        now after `messages`, as response.create would ask for it; returns it, its key and its request id."""
        settings = self.session.settings
        documents = context_block(await self.retrieve(text))
        prompt = self.compose(documents, messages, text)
        sampling = sampling_of(settings)
        request = GenerateRequest(
            self.gateway.new_id("predecode"),
            settings.model,
            sampling,
            messages=prompt,
            deadline=time.time() + self.gateway.config.preload_ttl_s,
            session_id=self.session.id,
            priority=PREDECODE_PRIORITY,
            predecode=tokens,
        )
        generation = await self.gateway.generate(request, tenant=self.tenant)
        return generation, predecode_key(settings.model, prompt, sampling), request.request_id
