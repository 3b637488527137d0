"""Runs `blink bench --typing` (the keystroke plans of typing.py) against each target, one after the other, and
writes NAME.md and NAME.json. Every user has a connection per question; its clock for a submit starts at Enter.

Server-side counters (blink only; other servers report none) are read from /metrics before and after a target's
run: pre-load prefill tokens computed and used (`blink_preload_*`) and pre-decoded tokens adopted and wasted
(`blink_predecode_tokens_total`).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

from blink.bench.clients import Target, WsDriver, _error_code, _expect, _recv, _send, _usage, chat_body, failure
from blink.bench.runner import targets
from blink.bench.typing import Question, typing_sessions
from blink.bench.workload import block_text
from blink.config import BenchConfig

QUESTIONS_PER_USER = 200  # more than any run's duration lets a user type
COUNTERS = (
    ("blink_preload_prefill_tokens_total", "preload_computed"),
    ("blink_preload_used_tokens_total", "preload_used"),
    ('blink_predecode_tokens_total{outcome="adopted"}', "predecode_adopted"),
    ('blink_predecode_tokens_total{outcome="wasted"}', "predecode_wasted"),
)


@dataclass
class Submit:
    user: int
    still: bool  # the text submitted is the one the user paused on (no edit just before Enter)
    at_s: float = 0.0  # Enter, seconds after the run's start
    stamps: list[float] = field(default_factory=list)  # each delta's arrival, seconds after Enter
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    predecoded: int = 0
    error: str | None = None


def _counters(text: str) -> dict[str, float]:
    """The COUNTERS summed over their series (a family's, or one labelled series') in a /metrics text."""
    out = dict.fromkeys((name for _, name in COUNTERS), 0.0)
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        for key, name in COUNTERS:
            family, labelled = key.split("{")[0], "{" in key
            if series == key or (not labelled and series.startswith(family + "{")):
                out[name] += float(value)
    return out


class _User:
    def __init__(self, target: Target, cfg: BenchConfig, http: httpx.AsyncClient) -> None:
        self.target, self.cfg, self.http = target, cfg, http
        self.headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self.ws_url = WsDriver(target, cfg).ws_url

    async def ask(self, user: int, q: Question, t0: float) -> Submit:
        sub = Submit(user, still=not q.revision)
        try:
            async with asyncio.timeout(self.cfg.request_timeout_s + q.typing_s):
                if self.target.protocol == "ws":
                    await self._ws(q, sub, t0)
                else:
                    await self._sse(q, sub, t0)
        except Exception as e:
            kind, detail = failure(e, self.cfg.request_timeout_s + q.typing_s)
            sub.error = f"{kind}: {detail}"[:300]
        return sub

    async def _ws(self, q: Question, sub: Submit, t0: float) -> None:
        cfg = self.cfg
        async with connect(self.ws_url, additional_headers=self.headers, max_size=None) as ws:
            await _expect(ws, "session.created")
            settings = {
                "model": cfg.model,
                "temperature": cfg.temperature,
                "max_output_tokens": cfg.max_output_tokens,
                "cache": cfg.server_cache,
            }
            await _send(ws, {"type": "session.update", "session": settings, "event_id": "update"})
            await _expect(ws, "session.updated")
            last = None
            for keys, pause in ((q.keys, q.pause_s), (q.revision, 0.0)):
                for key in keys:
                    await asyncio.sleep(key.delay_s)
                    if key.text != last:
                        await _send(ws, {"type": "input_text.draft", "text": key.text, "event_id": "draft"})
                        last = key.text
                await asyncio.sleep(pause)
            enter = time.perf_counter()
            sub.at_s = enter - t0
            item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": q.text}]}
            await _send(ws, {"type": "conversation.item.create", "item": item, "event_id": "item"})
            await _send(ws, {"type": "response.create", "event_id": "create"})
            while True:
                event = await _recv(ws)
                if event["type"] == "response.output_text.delta":
                    sub.stamps.append(time.perf_counter() - enter)
                elif event["type"] == "response.done":
                    response = event["response"]
                    if response.get("status") not in ("completed", "incomplete"):
                        sub.error = f"response {response.get('status')}: {response.get('status_details')}"[:300]
                    usage = response.get("usage") or {}
                    sub.output_tokens = int(usage.get("output_tokens") or len(sub.stamps))
                    sub.prompt_tokens = usage.get("input_tokens")
                    sub.cached_tokens = (usage.get("input_token_details") or {}).get("cached_tokens")
                    sub.predecoded = int((response.get("timings") or {}).get("predecoded_tokens") or 0)
                    return

    async def _sse(self, q: Question, sub: Submit, t0: float) -> None:
        cfg = self.cfg
        await asyncio.sleep(q.typing_s)
        body = chat_body(cfg, q.text, cfg.max_output_tokens, ignore_eos=False)  # answers end as on the WebSocket
        enter = time.perf_counter()
        sub.at_s = enter - t0
        url = self.target.base + "/v1/chat/completions"
        async with self.http.stream("POST", url, json=body, headers=self.headers) as response:
            if response.status_code != 200:
                sub.error = f"http {response.status_code} {_error_code((await response.aread()).decode())}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                _usage(chunk, sub)
                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                    sub.stamps.append(time.perf_counter() - enter)
        if not sub.stamps and sub.error is None:
            sub.error = "no text"


async def run_target(cfg: BenchConfig, target: Target, plans: list[list[Question]]) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None)) as http:
        try:
            await http.get(target.base + "/v1/models", timeout=10)
        except httpx.HTTPError as e:
            raise ConnectionError(f"{target.base}: {type(e).__name__}: {e}") from e
        user = _User(target, cfg, http)
        for _ in range(cfg.warmup):  # unmeasured: the model's first requests, the whole text at once
            await user.ask(-1, Question(plans[0][0].keys[-1:], 0.0, (), 0.0), time.perf_counter())
        before = await _scrape(http, target)
        submits: list[Submit] = []
        t0 = time.perf_counter()

        async def one(u: int) -> None:
            for q in plans[u]:
                if time.perf_counter() - t0 >= cfg.duration_s:
                    return
                submits.append(await user.ask(u, q, t0))
                await asyncio.sleep(q.read_s)

        await asyncio.gather(*(one(u) for u in range(len(plans))))
        wall = time.perf_counter() - t0
        after = await _scrape(http, target)
    counters = {k: after[k] - before[k] for k in after} if before and after else {}
    return summarize(target, submits, counters, wall, plans)


async def _scrape(http: httpx.AsyncClient, target: Target) -> dict[str, float]:
    try:
        response = await http.get(target.base + "/metrics", timeout=10)
    except httpx.HTTPError:
        return {}
    return _counters(response.text) if response.status_code == 200 else {}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def summarize(
    target: Target, submits: list[Submit], counters: dict[str, float], wall: float, plans: list[list[Question]]
) -> dict[str, Any]:
    ok = [s for s in submits if s.error is None and s.stamps]
    ttft = [s.stamps[0] for s in ok]
    still = [s.stamps[0] for s in ok if s.still]
    edited = [s.stamps[0] for s in ok if not s.still]
    gaps = [b - a for s in ok for a, b in zip(s.stamps, s.stamps[1:], strict=False)]
    prompt = sum(s.prompt_tokens or 0 for s in ok)
    asked = [q for user in plans for q in user][: len(submits)]
    out: dict[str, Any] = {
        "target": target.label,
        "url": target.url,
        "protocol": target.protocol,
        "users": len(plans),
        "wall_s": round(wall, 1),
        "submits": len(submits),
        "errors": len(submits) - len(ok),
        "error_kinds": sorted({(s.error or "no text").split(":")[0] for s in submits if s not in ok}),
        "enter_ttft_ms": {"p50": _pct(ttft, 0.5), "p90": _pct(ttft, 0.9), "p99": _pct(ttft, 0.99)},
        "still": {"n": len(still), "p50": _pct(still, 0.5), "p99": _pct(still, 0.99)},
        "edited": {"n": len(edited), "p50": _pct(edited, 0.5), "p99": _pct(edited, 0.99)},
        "itl_ms": {"p50": _pct(gaps, 0.5), "p99": _pct(gaps, 0.99)},
        "cached_share": round(sum(s.cached_tokens or 0 for s in ok) / prompt, 3) if prompt else None,
        "predecoded_share": round(sum(1 for s in ok if s.predecoded) / len(ok), 3) if ok else None,
        "keystrokes_per_char": round(sum(q.keystrokes for q in asked) / max(1, sum(len(q.text) for q in asked)), 3),
        "counters": counters,
        "submits_detail": [
            {
                "user": s.user,
                "at_s": round(s.at_s, 3),
                "still": s.still,
                "ttft_ms": _pct(s.stamps[:1], 0.5),
                "tokens": s.output_tokens,
                "prompt": s.prompt_tokens,
                "cached": s.cached_tokens,
                "predecoded": s.predecoded,
                "error": s.error,
            }
            for s in submits
        ],
    }
    if counters:
        wasted_prefill = counters["preload_computed"] - counters["preload_used"]
        out["wasted_prefill_per_useful"] = _ratio(wasted_prefill, counters["preload_used"])
        out["wasted_decode_per_useful"] = _ratio(counters["predecode_wasted"], counters["predecode_adopted"])
    return out


def markdown(summaries: list[dict[str, Any]]) -> str:
    head = (
        "| target | proto | users | submits | err | Enter→1st p50 | p99 | still p50 | still p99 | edited p50 | "
        "ITL p50 | ITL p99 | cached | pre-decoded | wasted prefill/useful | wasted decode/useful |"
    )
    rows = [head, "|" + "---|" * 16]

    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    for s in summaries:
        e, st, ed, itl = s["enter_ttft_ms"], s["still"], s["edited"], s["itl_ms"]
        rows.append(
            f"| {s['target']} | {s['protocol']} | {s['users']} | {s['submits']} | {s['errors']} | {f(e['p50'])} | "
            f"{f(e['p99'])} | {f(st['p50'])} | {f(st['p99'])} | {f(ed['p50'])} | {f(itl['p50'])} | "
            f"{f(itl['p99'])} | {f(s['cached_share'])} | {f(s['predecoded_share'])} | "
            f"{f(s.get('wasted_prefill_per_useful'))} | {f(s.get('wasted_decode_per_useful'))} |"
        )
    if len(summaries) == 2 and all(s["enter_ttft_ms"]["p50"] for s in summaries):
        a, b = summaries
        rows.append("")
        rows.append(
            f"{a['target']} / {b['target']}: Enter→first token p50 "
            f"{a['enter_ttft_ms']['p50'] / b['enter_ttft_ms']['p50']:.3f}x, p99 "
            f"{(a['enter_ttft_ms']['p99'] or 0) / (b['enter_ttft_ms']['p99'] or 1):.3f}x; ITL p99 "
            f"{(a['itl_ms']['p99'] or 0) / (b['itl_ms']['p99'] or 1):.2f}x"
        )
    return "\n".join(rows)


def main(cfg: BenchConfig) -> int:
    users = int(cfg.concurrency or 8)
    context = " ".join(block_text(h) for h in range(max(0, cfg.max_prompt_tokens - 24) // 8)) if cfg.context else ""
    plans = typing_sessions(
        users,
        QUESTIONS_PER_USER,
        cfg.seed,
        context=context,
        enter_pause_s=cfg.enter_pause_ms / 1000,
        edit_fraction=cfg.edit_fraction,
    )
    summaries = []
    for target in targets(cfg):
        try:
            summaries.append(asyncio.run(run_target(cfg, target, plans)))
        except ConnectionError as e:
            print(f"blink bench: {target.label}: cannot run: {e}", file=sys.stderr)
            return 1
    table = markdown(summaries)
    print(table)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in asdict(cfg).items() if k != "api_key"}
    (out / f"{cfg.name}.json").write_text(json.dumps({"settings": settings, "targets": summaries}, indent=2))
    (out / f"{cfg.name}.md").write_text(f"# blink bench --typing\n\n{table}\n")
    print(f"report: {out / cfg.name}.md, {out / cfg.name}.json")
    return 0
