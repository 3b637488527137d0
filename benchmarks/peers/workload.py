"""The requests every peer gets (the same ones, in the same order) and the one client that sends them.

Prompts are cut from fixed text (data/*.txt) to a target length in tokens of the whole chat prompt, counted with
the model's own tokenizer and chat template (from the Hugging Face export). Each request takes text no other request
of the run uses, so prefix caches only help where the benchmark asks them to (the shared-prefix phase).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DATA = Path(__file__).resolve().parent / "data"
QUESTIONS = (
    "Summarise the text above in a few sentences.",
    "What are the three most important facts in the text above?",
    "Explain the text above to a ten-year-old.",
    "Which questions does the text above leave open?",
)


@dataclass(frozen=True)
class Request:
    messages: tuple[dict[str, str], ...]
    max_tokens: int
    prompt_tokens: int  # the whole chat prompt, as the model's tokenizer and template count it


@dataclass
class Result:
    ttft_s: float | None = None  # request sent -> first chunk with text
    stamps: list[float] = field(default_factory=list)  # arrival of each chunk with text, seconds after sending
    text: str = ""
    output_tokens: int = 0
    tokens_from: str = ""  # "usage" (the server's count) or "tokenizer" (the text re-tokenized)
    error: str | None = None

    @property
    def gaps_s(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


class Prompts:
    """Cuts prompts of a given token length from the text, never reusing a part of it."""

    def __init__(self, tokenizer: Any, text: str) -> None:
        self.tokenizer = tokenizer
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        self.text, self.offsets = text, enc["offset_mapping"]
        self.cursor = 0
        self._overhead: dict[str, int] = {}

    @classmethod
    def load(cls, model_dir: Path) -> Prompts:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        text = "\n\n".join(p.read_text(errors="replace") for p in sorted(DATA.glob("*.txt")))
        return cls(tokenizer, text)

    def count(self, messages: Sequence[dict[str, str]]) -> int:
        ids = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        return len(ids)

    def document(self, tokens: int) -> str:
        """The next `tokens` tokens of the text, as text."""
        if self.cursor + tokens > len(self.offsets):
            raise ValueError("the prompt text is used up: ask for fewer or shorter requests")
        start, end = self.offsets[self.cursor][0], self.offsets[self.cursor + tokens - 1][1]
        self.cursor += tokens
        return self.text[start:end].strip()

    def request(
        self, target_tokens: int, max_tokens: int, question: str = QUESTIONS[0], document: str | None = None
    ) -> Request:
        """A one-message chat request of about `target_tokens` prompt tokens (template included): a fresh part of
        the text (or `document`), then `question`."""
        if document is None:
            if question not in self._overhead:
                self._overhead[question] = self.count(self._messages("", question))
            document = self.document(max(1, target_tokens - self._overhead[question]))
        messages = self._messages(document, question)
        return Request(messages, max_tokens, self.count(messages))

    def output_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @staticmethod
    def _messages(document: str, question: str) -> tuple[dict[str, str], ...]:
        return ({"role": "user", "content": f"{document}\n\n{question}"},)


async def send(
    client: httpx.AsyncClient, url: str, model: str, req: Request, prompts: Prompts, timeout_s: float
) -> Result:
    """Streams one greedy chat completion; never raises for the server's failures, which land in Result.error."""
    body = {
        "model": model,
        "messages": list(req.messages),
        "max_tokens": req.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result, parts, usage_tokens = Result(), [], None
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s), client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"stream error: {str(event['error'])[:200]}"
                    return result
                if event.get("usage") and event["usage"].get("completion_tokens") is not None:
                    usage_tokens = int(event["usage"]["completion_tokens"])
                for choice in event.get("choices") or []:
                    if content := (choice.get("delta") or {}).get("content"):
                        result.stamps.append(time.perf_counter() - t0)
                        parts.append(content)
    except TimeoutError:
        result.error = f"no complete answer within {timeout_s:.0f} s"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    result.text = "".join(parts)
    result.ttft_s = result.stamps[0] if result.stamps else None
    if usage_tokens is not None:
        result.output_tokens, result.tokens_from = usage_tokens, "usage"
    else:
        result.output_tokens, result.tokens_from = prompts.output_tokens(result.text), "tokenizer"
    if result.error is None and not result.stamps:
        result.error = "the stream held no text"
    return result


@dataclass
class Batch:
    results: list[Result]
    wall_s: float  # first request sent -> last response finished


async def run_batch(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    reqs: Sequence[Request],
    concurrency: int,
    prompts: Prompts,
    timeout_s: float,
) -> Batch:
    """Sends `reqs` keeping at most `concurrency` in flight (a new one starts as soon as one finishes)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(req: Request) -> Result:
        async with gate:
            return await send(client, url, model, req, prompts, timeout_s)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(r) for r in reqs))
    return Batch(list(results), time.perf_counter() - t0)


def chunks(items: Sequence[Request], size: int) -> Iterator[Sequence[Request]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
