"""`blink edge` in front of a core 80 ms away, against a client sitting next to the core, one run, all up at once.

    client --(netem, --user-rtt-ms)--> blink edge --(netem, --rtt-ms, one warm link)--> blink serve (the core)
    client next to the core ---------------------------------------------------------> blink serve

Phases, each measured by this client:
1. Edge-served: --users users at once, each asking short questions (naming the edge's model) one after another for
   --edge-requests each (after a first one, all users at the same instant, that opens the connections: not
   counted); time to first token at the client, p50 and p99.
2. Core-routed path: one ~100-token chat for the core's model, sent alternately next to the core and through the
   edge (--rounds pairs; the core answers from its prefix cache, so what is left is the path). The edge's added
   first-token latency is the median of the pairs' differences; target: <= 1 RTT + 10 ms.
3. Typing: --typists users one after another type a code question (so `auto` routes it to the core) word by word
   (--word-ms), every word a draft forwarded over the link (the core pre-loads), the last keystroke's draft the
   text as sent, then submit; submit -> first token; target p50 <= 1 RTT + 40 ms.
4. Mixed workload, `auto`: short factual questions with known answers, questions about a pasted article (the
   Question-Answer Dataset's articles, ../shared/data/rag), code and open questions (MT-Bench's first turns). Each
   goes through the edge with `auto` (its route and latency), and is also answered by the model of the route not
   taken (the core's model directly, or the edge's model named through the edge), greedy, so every prompt has both
   answers. The quality rule (stated in the report): an edge answer is acceptable when, for a question with a known
   answer, it contains it, or the core's does not either; else when its embedding (all-MiniLM-L6-v2) has cosine
   similarity >= --agree with the core's answer. A class may be kept at the edge when >= --keep of its answers are.
5. A 5 s cut of the link (blackhole) under 8 streams of the core's model: how each stream ended, and how long the
   link took to come back after the cut ended.

  make install-qwen && python benchmarks/edge.py [--core-model qwen2.5-coder-1.5b-instruct]
Writes results/edge.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write_report
from benchmarks.preload import send, submit, until
from blink.bench.netem import Proxy
from blink.config import default_cache_dir
from blink.semantic_cache.embedder import load_embedder

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared/data"

FACTUAL = [  # (question, accepted answers)
    ("What is the capital of France?", ["paris"]),
    ("What is the capital of Japan?", ["tokyo"]),
    ("What is the capital of Germany?", ["berlin"]),
    ("What is the capital of Spain?", ["madrid"]),
    ("How many legs does a spider have?", ["eight", "8"]),
    ("How many days are in a week?", ["seven", "7"]),
    ("What is the largest planet in our solar system?", ["jupiter"]),
    ("What gas do plants absorb from the air?", ["carbon dioxide", "co2"]),
    ("What is the boiling point of water in degrees Celsius?", ["100"]),
    ("Who wrote Romeo and Juliet?", ["shakespeare"]),
    ("What is the chemical symbol for gold?", ["au"]),
    ("Which ocean is the largest?", ["pacific"]),
    ("What colour is the sky on a clear day?", ["blue"]),
    ("How many continents are there?", ["seven", "7"]),
    ("What is the freezing point of water in degrees Celsius?", ["0", "zero"]),
    ("Who painted the Mona Lisa?", ["leonardo", "da vinci"]),
    ("What is the tallest mountain in the world?", ["everest"]),
    ("What is the main language spoken in Brazil?", ["portuguese"]),
    ("How many hours are in a day?", ["24", "twenty-four", "twenty four"]),
    ("What is the currency of the United Kingdom?", ["pound"]),
    ("Which planet is known as the Red Planet?", ["mars"]),
    ("What is the largest mammal?", ["blue whale"]),
    ("In which country are the pyramids of Giza?", ["egypt"]),
    ("What do bees make?", ["honey"]),
]
CODE_EXTRA = [
    "Write a Python function that returns the squares of a list of numbers.",
    "Write a SQL query that counts the orders of each customer.",
    "Fix this code: def add(a, b): return a - b",
]


def mixed(articles: int, open_per_category: int) -> list[dict[str, Any]]:
    """The mixed workload: [{cls, question, messages, answers}]."""
    out: list[dict[str, Any]] = []
    for question, answers in FACTUAL:
        out.append({"cls": "factual", "question": question, "answers": answers})
    mt = [json.loads(line) for line in (DATA / "multiturn/mt_bench_questions.jsonl").read_text().splitlines()]
    for q in mt:
        if q["category"] == "coding":
            out.append({"cls": "code", "question": q["turns"][0], "answers": []})
    out += [{"cls": "code", "question": q, "answers": []} for q in CODE_EXTRA]
    seen: dict[str, int] = {}
    for q in mt:
        if q["category"] != "coding" and seen.get(q["category"], 0) < open_per_category:
            seen[q["category"]] = seen.get(q["category"], 0) + 1
            out.append({"cls": "open", "question": q["turns"][0], "answers": []})
    out += document_questions(articles)
    for item in out:
        item.setdefault("messages", [{"role": "user", "content": item["question"]}])
    return out


def document_questions(count: int) -> list[dict[str, Any]]:
    """A question about an article pasted into the message (its first ~350 words), with the dataset's answer."""
    rag = DATA / "rag/S08"
    rows = [line.split("\t") for line in (rag / "question_answer_pairs.txt").read_text(errors="replace").splitlines()]
    out, used = [], set()
    for row in rows[1:]:
        answer = row[2].strip().rstrip(".").lower() if len(row) >= 6 else ""
        wh = len(row) >= 6 and row[1].lower().startswith(("who ", "what ", "when ", "where ", "which ", "how "))
        if not wh or row[5] in used or answer in ("", "null") or len(answer.split()) > 4:
            continue
        path = rag / (row[5].strip() + ".txt")
        if not path.is_file():
            continue
        article = " ".join(path.read_text(errors="replace").split()[:350])
        used.add(row[5])
        content = f"{article}\n\nQuestion about the text above: {row[1]}"
        out.append(
            {
                "cls": "document",
                "question": row[1],
                "answers": [answer],
                "messages": [{"role": "user", "content": content}],
            }
        )
        if len(out) == count:
            break
    return out


# processes ---------------------------------------------------------------------------------------------------
class Blink:
    def __init__(self, name: str, argv: list[str], port: int, logs: Path) -> None:
        self.base = f"http://127.0.0.1:{port}"
        logs.mkdir(parents=True, exist_ok=True)
        self.log = (logs / f"{name}.log").open("wb")
        cmd = [str(REPO / ".venv/bin/blink"), *argv, "--port", str(port)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=os.environ.copy())

    async def ready(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"{self.base} exited"
                try:
                    if (await client.get(self.base + "/readyz", timeout=2)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.5)
        raise TimeoutError(self.base)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def stream(client: httpx.AsyncClient, base: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed chat: first-token ms at this client, the text, the route and timings blink reported."""
    body = {"temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **body}
    start, first, text, route = time.perf_counter(), None, "", ""
    timings: dict[str, Any] = {}
    async with client.stream("POST", base + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        route = response.headers.get("x-blink-route", "")
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            chunk = json.loads(line[5:])
            delta = "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices", []))
            if delta and first is None:
                first = (time.perf_counter() - start) * 1000
            text += delta
            timings = chunk.get("timings") or timings
    return {"ttft_ms": first if first is not None else float("nan"), "text": text, "route": route, "timings": timings}


# phases ------------------------------------------------------------------------------------------------------
async def edge_served(user_url: str, users: int, requests: int, edge_model: str) -> dict[str, Any]:
    rng = random.Random(3)

    async def user(u: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        async with httpx.AsyncClient(timeout=120) as client:
            for n in range(requests + 1):  # the first, all users at the same instant, opens the connections
                if n == 1:
                    out.clear()
                question, _ = rng.choice(FACTUAL)
                body = {"model": edge_model, "messages": [{"role": "user", "content": question}], "max_tokens": 16}
                out.append(await stream(client, user_url, {**body, "cache": False}))
        return out

    results = [r for rs in await asyncio.gather(*(user(u) for u in range(users))) for r in rs]
    ttfts = [r["ttft_ms"] for r in results]
    return {
        "ttft_ms": ttfts,
        "p50": pct(ttfts, 0.5),
        "p99": pct(ttfts, 0.99),
        "routes": sorted({r["route"] for r in results}),
    }


async def core_path(direct: str, user_url: str, core_model: str, rounds: int) -> dict[str, Any]:
    system = "You are a concise assistant. " * 12
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Say hello in French."}]
    body = {"model": core_model, "messages": messages, "max_tokens": 4, "cache": False}
    out: dict[str, list[float]] = {"direct": [], "edge": []}
    async with httpx.AsyncClient(timeout=120) as client:
        for i in range(rounds + 1):  # the first pair warms both paths (and the core's prefix cache) up
            order = [("direct", direct), ("edge", user_url)]
            for name, url in order if i % 2 else order[::-1]:
                r = await stream(client, url, body)
                if i:
                    out[name].append(r["ttft_ms"])
    diffs = [e - d for d, e in zip(out["direct"], out["edge"], strict=True)]
    return {**out, "added_median_ms": statistics.median(diffs), "added_p90_ms": pct(diffs, 0.9)}


async def typing(
    user_ws: str, typists: int, word_ms: float, core: str, model: str = "auto", seed: int = 11
) -> dict[str, Any]:
    """Submit -> first token of typists who type a code question (drafts forwarded), at `user_ws`: the edge (model
    auto, routed to the core) or the core itself (its model named), the baseline; `seed` makes each side's prompts
    its own (the other's are in the core's prefix cache)."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    before = await background_tokens(core)
    for t in range(typists + 1):
        question = f"Write a Python function number {t} that returns the squares of a list of numbers, with a test."
        async with connect(user_ws, max_size=None) as ws:
            await until(ws, "session.created")
            system = f"Session {t}-{rng.random():.6f}. You are a careful programmer who answers with short code. " * 4
            await send(ws, {"type": "session.update", "session": {"model": model, "instructions": system}})
            await until(ws, "session.updated")
            words = question.split()
            for i in range(len(words)):
                await asyncio.sleep(word_ms / 1000 * rng.uniform(0.7, 1.3))
                await send(ws, {"type": "input_text.draft", "text": " ".join(words[: i + 1]) + " "})
            await send(ws, {"type": "input_text.draft", "text": question})  # the last keystroke: the text as sent
            await asyncio.sleep(word_ms / 1000 * rng.uniform(0.7, 1.3))  # reads it over, presses Enter
            first, _, response = await submit(ws, question, 8)
        if t:  # the first warms the path
            timings = response.get("timings", {})
            out.append(
                {
                    "ms": first * 1000,
                    "route": response.get("route"),
                    "preloaded": timings.get("preloaded"),
                    "cached": timings.get("cached_tokens"),
                    "prompt": timings.get("prompt_tokens"),
                    "timings": timings,
                }
            )
    ms = [r["ms"] for r in out]
    return {
        "runs": out,
        "p50": pct(ms, 0.5),
        "p99": pct(ms, 0.99),
        "core_background_tokens": await background_tokens(core) - before,
    }


async def link_rtt_ms(edge: str) -> float:
    """The link's round trip as its pings measure it (the proxy's own scheduling adds a little to --rtt-ms)."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(edge + "/metrics", timeout=5)).text
    match = re.search(r"^blink_edge_link_rtt_seconds (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) * 1000 if match else float("nan")


async def background_tokens(base: str) -> int:
    async with httpx.AsyncClient() as client:
        state = (await client.get(base + "/readyz", timeout=5)).json()
    return sum(int(r["background_prefill_tokens"]) for r in state["replicas"])


async def mixed_workload(
    user_url: str, direct: str, models: tuple[str, str], items: list[dict[str, Any]], max_tokens: int
) -> list[dict[str, Any]]:
    edge_model, core_model = models
    async with httpx.AsyncClient(timeout=600) as client:
        for item in items:
            body = {"messages": item["messages"], "max_tokens": max_tokens, "cache": False}
            auto = await stream(client, user_url, {**body, "model": "auto"})
            item["route"], item["auto_ttft_ms"] = auto["route"], auto["ttft_ms"]
            item["rule"] = auto["timings"].get("route_rule", "")
            if auto["route"].startswith("edge"):
                item["edge"] = auto["text"]
                item["core"] = (await stream(client, direct, {**body, "model": core_model}))["text"]
            else:
                item["core"] = auto["text"]
                item["edge"] = (await stream(client, user_url, {**body, "model": edge_model}))["text"]
    return items


def contains(text: str, answers: list[str]) -> bool:
    """Whether `text` holds one of `answers` as whole words ("0" is not in "-18.000000")."""
    text = re.sub(r"\s+", " ", text.lower())
    return any(re.search(rf"(?<![\w.-]){re.escape(a)}(?!\w|\.\d)", text) for a in answers)


def judge(items: list[dict[str, Any]], agree: float) -> None:
    embedder = load_embedder("onnx-int8", default_cache_dir())
    for item in items:
        answers = item["answers"]
        if answers:
            item["edge_correct"] = contains(item["edge"], answers)
            item["core_correct"] = contains(item["core"], answers)
        e, c = embedder.embed([item["edge"] or " ", item["core"] or " "])
        item["similarity"] = float(e @ c / ((e @ e) ** 0.5 * (c @ c) ** 0.5))
        if answers:
            item["acceptable"] = item["edge_correct"] or not item["core_correct"]
        else:
            item["acceptable"] = item["similarity"] >= agree


async def link_cut(user_url: str, core_model: str, link: Proxy, edge: str) -> dict[str, Any]:
    started = [asyncio.Event() for _ in range(8)]

    async def one(i: int) -> str:
        body = {
            "model": core_model,
            "messages": [{"role": "user", "content": f"Count from {i} to a thousand."}],
            "max_tokens": 96,
            "ignore_eos": True,
            "cache": False,
            "temperature": 0,
            "stream": True,
        }
        tokens, finish = 0, None
        try:
            async with (
                httpx.AsyncClient(timeout=120) as client,
                client.stream("POST", user_url + "/v1/chat/completions", json=body) as response,
            ):
                if response.status_code != 200:
                    return f"error {response.status_code}"
                async for line in response.aiter_lines():
                    if line.startswith("data:") and not line.endswith("[DONE]"):
                        chunk = json.loads(line[5:])
                        if "error" in chunk:
                            return f"error {chunk['error'].get('code')}"
                        for c in chunk.get("choices", []):
                            started[i].set()
                            finish = c.get("finish_reason") or finish
                            tokens += 1
        except httpx.HTTPError as exc:
            return f"transport {type(exc).__name__}"
        return f"completed ({finish})" if finish else "ended without finish"

    tasks = [asyncio.create_task(one(i)) for i in range(8)]
    await asyncio.gather(*(e.wait() for e in started))
    link.cut("blackhole")
    await asyncio.sleep(5)
    link.restore()
    restored = time.monotonic()
    async with httpx.AsyncClient() as client:
        while "blink_edge_link_up 1.0" not in (await client.get(edge + "/metrics")).text:
            await asyncio.sleep(0.05)
    back_s = time.monotonic() - restored
    outcomes = await asyncio.gather(*tasks)
    return {"outcomes": outcomes, "link_back_after_s": back_s}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    logs = Path("/tmp/blink-edge-bench")
    p = args.port
    served = ["--served-model-name", core_name(args)]
    core = Blink(
        "core",
        ["serve", "--model", args.core_model, *served, "--max-num-seqs", "16", "--resume-window-s", "20"],
        p,
        logs,
    )
    link = Proxy("127.0.0.1", p, delay_ms=args.rtt_ms / 2)
    await link.start()
    edge_argv = ["edge", "--model", args.edge_model, "--core", f"http://127.0.0.1:{link.port}", "--max-num-seqs", "16"]
    edge = Blink("edge", edge_argv, p + 1, logs)
    user = Proxy("127.0.0.1", p + 1, delay_ms=args.user_rtt_ms / 2)
    await user.start()
    user_url, direct = f"http://127.0.0.1:{user.port}", core.base
    try:
        await core.ready()
        await edge.ready()
        async with httpx.AsyncClient() as client:  # until the edge learned the core's models over the link
            while core_name(args) not in (await client.get(edge.base + "/v1/models")).text:
                await asyncio.sleep(0.2)
        out: dict[str, Any] = {}
        print("1. edge-served", flush=True)
        out["edge_served"] = await edge_served(user_url, args.users, args.edge_requests, args.edge_model)
        print("2. core path", flush=True)
        out["core_path"] = await core_path(direct, user_url, core_name(args), args.rounds)
        out["link_rtt_ms"] = await link_rtt_ms(edge.base)
        print("3. typing", flush=True)
        user_ws, direct_ws = (url.replace("http", "ws") + "/v1/realtime" for url in (user_url, direct))
        out["typing"] = await typing(user_ws, args.typists, args.word_ms, direct)
        out["typing_direct"] = await typing(direct_ws, args.typists, args.word_ms, direct, core_name(args), seed=12)
        print("4. mixed", flush=True)
        items = mixed(args.articles, args.open_per_category)
        models = (args.edge_model, core_name(args))
        out["mixed"] = [] if args.no_mixed else await mixed_workload(user_url, direct, models, items, args.max_tokens)
        print("5. link cut", flush=True)
        out["link_cut"] = await link_cut(user_url, core_name(args), link, edge.base)
        async with httpx.AsyncClient() as client:
            out["edge_metrics"] = [
                line
                for line in (await client.get(edge.base + "/metrics")).text.splitlines()
                if line.startswith(("blink_edge_link", "blink_routes_total"))
            ]
        return out
    finally:
        edge.stop()
        core.stop()
        await user.close()
        await link.close()


def core_name(args: argparse.Namespace) -> str:
    """The core's model as served: its own name, with "core-" in front where it is the edge's model too."""
    return f"core-{args.core_model}" if args.core_model == args.edge_model else args.core_model


def report(args: argparse.Namespace, out: dict[str, Any]) -> str:
    rtt = args.rtt_ms
    es, cp, ty = out["edge_served"], out["core_path"], out["typing"]
    lines = [
        "# blink edge in front of a core\n",
        f"`python benchmarks/edge.py --edge-model {args.edge_model} --core-model {args.core_model} --rtt-ms {rtt:g} "
        f"--user-rtt-ms {args.user_rtt_ms:g}{' --no-mixed' if args.no_mixed else ''} --name {args.name}`; "
        f"{machine(f'edge model {args.edge_model}, core model {args.core_model}')}; core, edge and the two "
        "latency proxies (blink.bench.netem) on this one machine.\n",
        "| target | measured | holds? |",
        "|---|---|---|",
        f"| edge-served (the edge's model named), {args.users} users: p50 first token < 100 ms, p99 < 200 ms | "
        f"p50 {es['p50']:.0f} ms, p99 "
        f"{es['p99']:.0f} ms (routes {', '.join(es['routes'])}) | "
        f"{'yes' if es['p50'] < 100 and es['p99'] < 200 else 'no'} |",
        "| core-routed: first token <= 1 RTT + 10 ms over a client next to the core | added "
        f"{cp['added_median_ms']:.1f} ms median (p90 {cp['added_p90_ms']:.1f}); the link's RTT by its pings "
        f"{out['link_rtt_ms']:.1f} ms, the user's {args.user_rtt_ms:g} ms nominal; direct "
        f"{statistics.median(cp['direct']):.0f} ms, through the edge {statistics.median(cp['edge']):.0f} ms | "
        f"{'yes' if cp['added_median_ms'] <= out['link_rtt_ms'] + 10 else 'no'} against the measured RTT, "
        f"{'yes' if cp['added_median_ms'] <= rtt + 10 else 'no'} against the nominal |",
        f"| typing, drafts forwarded: submit -> first token p50 <= 1 RTT + 40 ms | p50 {ty['p50']:.0f} ms, p99 "
        f"{ty['p99']:.0f} ms; the core computed {ty['core_background_tokens']} pre-load tokens (a typist next to "
        f"the core: p50 {out['typing_direct']['p50']:.0f} ms) | "
        f"{'yes' if ty['p50'] <= out['link_rtt_ms'] + 40 else 'no'} against the measured RTT, "
        f"{'yes' if ty['p50'] <= rtt + 40 else 'no'} against the nominal |",
    ]
    cut = out["link_cut"]
    done = sum(o.startswith("completed") for o in cut["outcomes"])
    lines.append(
        f"| link cut 5 s under 8 streams: none lost silently, the edge recovers | {done}/8 completed, others: "
        f"{[o for o in cut['outcomes'] if not o.startswith('completed')]}; link back {cut['link_back_after_s']:.2f} s "
        f"after the cut ended | {'yes' if all(o.startswith(('completed', 'error')) for o in cut['outcomes']) else 'no'}"
        " |"
    )
    if not out["mixed"]:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "## `auto` on a mixed workload\n",
        quality_rule(args),
        "",
        "| class | prompts | kept at the edge | edge answers acceptable (all prompts) | kept: acceptable | "
        "edge first token p50 (ms) | core first token p50 (ms) | may be kept (>= "
        f"{args.keep:.0%} acceptable) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    items = out["mixed"]
    for cls in ("factual", "open", "code", "document"):
        of = [i for i in items if i["cls"] == cls]
        kept = [i for i in of if i["route"].startswith("edge")]
        ok = sum(i["acceptable"] for i in of) / len(of)
        kept_ok = f"{sum(i['acceptable'] for i in kept)}/{len(kept)}" if kept else "-"
        e = [i["auto_ttft_ms"] for i in kept]
        c = [i["auto_ttft_ms"] for i in of if i["route"] == "core"]
        lines.append(
            f"| {cls} | {len(of)} | {len(kept)} | {ok:.0%} | {kept_ok} | {pct(e, 0.5):.0f} | {pct(c, 0.5):.0f} | "
            f"{'yes' if ok >= args.keep else 'no'} |"
        )
    share = sum(i["route"].startswith("edge") for i in items) / len(items)
    kept = [i for i in items if i["route"].startswith("edge")]
    lines.append(
        f"\nServed at the edge: {share:.0%} of {len(items)} prompts; of those, "
        f"{sum(i['acceptable'] for i in kept)}/{len(kept)} acceptable by the rule."
    )
    facts = [i for i in items if i["answers"]]
    lines.append(
        f"Known answers: the edge model got {sum(i['edge_correct'] for i in facts)}/{len(facts)}, the core "
        f"model {sum(i['core_correct'] for i in facts)}/{len(facts)}.\n"
    )
    lines.append("Link state at the end: " + "; ".join(f"`{m}`" for m in out["edge_metrics"]))
    return "\n".join(lines) + "\n"


def quality_rule(args: argparse.Namespace) -> str:
    return (
        f"Rule: an edge answer is acceptable when, for a question with a known answer, it contains that answer (or "
        f"the core's does not either); otherwise when its all-MiniLM-L6-v2 embedding has cosine similarity >= "
        f"{args.agree:g} with the core's answer to the same prompt (greedy, {args.max_tokens} tokens each). Every "
        "prompt is answered by both models: the route `auto` chose, and the other one asked by name."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--core-model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--edge-model", default="smollm2-135m-instruct")
    parser.add_argument("--no-mixed", action="store_true", help="skip phase 4 (latency only)")
    parser.add_argument("--name", default="edge", help="the report's file name in --out")
    parser.add_argument("--rtt-ms", type=float, default=80)
    parser.add_argument("--user-rtt-ms", type=float, default=5)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--edge-requests", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--typists", type=int, default=8)
    parser.add_argument("--word-ms", type=float, default=250)
    parser.add_argument("--articles", type=int, default=8)
    parser.add_argument("--open-per-category", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--agree", type=float, default=0.8)
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--port", type=int, default=18600)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()
    started = time.monotonic()
    out = asyncio.run(run(args))
    judge(out["mixed"], args.agree)
    print(f"measured in {time.monotonic() - started:.0f} s", flush=True)
    markdown = report(args, out)
    print(markdown)
    write_report(args.out, args.name, markdown, {"args": vars(args) | {"out": str(args.out)}, **out})


if __name__ == "__main__":
    main()
