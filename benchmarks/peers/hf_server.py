"""The transformers peer: a tiny OpenAI-compatible streaming server around `AutoModelForCausalLM.generate`.

One request at a time (a lock around generate, no batching), tokens handed over by `TextIteratorStreamer`, which
releases text a word at a time (it holds a token back until the next one shows where the word ends). Streams
`chat.completion.chunk` SSE events ending with `data: [DONE]`; greedy when temperature is 0. A client that
disconnects stops its generation at the next token. Not blink code: it exists to be measured by run.py.

    .venvs/hf/bin/python benchmarks/peers/hf_server.py --model DIR [--host 127.0.0.1] [--port 8000] [--threads 2]

Endpoints: POST /v1/chat/completions (stream true or false), GET /v1/models, GET /health.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


class _StopOn(transformers.StoppingCriteria):
    """Stops generate() once `event` is set (the client went away)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> bool:
        return self.event.is_set()


@dataclass
class Model:
    name: str
    model: Any
    tokenizer: Any
    lock: threading.Lock  # generate() is not re-entrant and we serve one request at a time by design

    def generate(self, body: dict[str, Any], streamer: Any, stop: threading.Event) -> int:
        """Runs generate() for one chat request, feeding `streamer`; returns the number of new tokens."""
        ids = self.tokenizer.apply_chat_template(
            body["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        temperature = float(body.get("temperature", 1.0))
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": float(body.get("top_p", 1.0))}
        max_new = int(body.get("max_completion_tokens") or body.get("max_tokens") or 256)
        with self.lock, torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                streamer=streamer,
                stopping_criteria=transformers.StoppingCriteriaList([_StopOn(stop)]),
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling,
            )
        return int(out.shape[1] - ids.shape[1])


def _chunk(cid: str, model: str, delta: dict[str, Any], finish: str | None) -> str:
    event = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(event)}\n\n"


async def _stream(m: Model, body: dict[str, Any]) -> AsyncIterator[str]:
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    # the asyncio flavour of TextIteratorStreamer: the generate thread hands text to this loop without parking an
    # executor thread per waiting request (32 queued requests would starve the default executor)
    streamer = transformers.AsyncTextIteratorStreamer(m.tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = threading.Event()
    result: dict[str, int] = {}

    def work() -> None:
        try:
            result["tokens"] = m.generate(body, streamer, stop)
        finally:
            if "tokens" not in result:
                streamer.end()  # generate() failed before ending the stream: the consumer must not wait forever

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        yield _chunk(cid, m.name, {"role": "assistant", "content": ""}, None)
        async for text in streamer:
            if text:
                yield _chunk(cid, m.name, {"content": text}, None)
        tokens = result.get("tokens", 0)
        max_new = int(body.get("max_completion_tokens") or body.get("max_tokens") or 256)
        yield _chunk(cid, m.name, {}, "length" if tokens >= max_new else "stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "id": cid,
                "object": "chat.completion.chunk",
                "model": m.name,
                "choices": [],
                "usage": {"completion_tokens": tokens},
            }
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        stop.set()


def make_app(m: Model) -> Starlette:
    async def chat(request: Request) -> Response:
        body = await request.json()
        if body.get("stream"):
            return StreamingResponse(_stream(m, body), media_type="text/event-stream")
        parts = [json.loads(e[6:]) for e in [x async for x in _stream(m, body)] if e[6:].startswith("{")]
        text = "".join(p["choices"][0]["delta"].get("content", "") for p in parts if p["choices"])
        return JSONResponse(
            {
                "object": "chat.completion",
                "model": m.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            }
        )

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": m.name, "object": "model", "owned_by": "hf"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models),
            Route("/health", health),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a Hugging Face model folder")
    parser.add_argument("--name", default="smollm2-135m-instruct", help="model id in /v1/models")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.model))
    app = make_app(Model(args.name, model, tokenizer, threading.Lock()))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
