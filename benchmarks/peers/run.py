"""Peer comparison: blink against llama.cpp, vLLM (CPU) and transformers, same model, same machine, same client.

Not run in CI. Install the peers first (benchmarks/peers/setup.sh), then, with blink's venv:

    .venv/bin/python benchmarks/peers/run.py [--peers blink,llamacpp,llamaserver,vllm,hf] [--quick]
        [--blink-args "--max-num-seqs 32"] [--extra-args PEER="FLAGS"] [--threads 2] [--out benchmarks/results]

Peers run one at a time (never two servers at once), each on its own 127.0.0.1 port, and are stopped after. Every
request goes to the peer's OpenAI-compatible `POST /v1/chat/completions` with stream=true and temperature 0, from
this one client, and every peer gets the same requests in the same order:

  warm-up        2 requests one at a time, then 8 at once (not measured)
  c1-100         ~100-token prompts, one at a time: TTFT, and inter-token latency (gaps between chunks with text)
  c1-500         ~500-token prompts, one at a time: TTFT
  prefix-500     a ~500-token document with one question, then the same document with another question: TTFT of
                 the second (the first 500 tokens were just served)
  c8, c32        ~100-token prompts, 8 or 32 in flight: TTFT p50/p99, output tokens/s of all streams together

TTFT is request sent -> first chunk with text. Peak RSS is VmHWM summed over the server's process tree. Prints a
markdown table and writes benchmarks/results/peers-<date>[-quick].md and .json (with every raw figure).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.peers import report
from benchmarks.peers.servers import PEERS, DidNotStart, Env, Server, install_problem, version
from benchmarks.peers.workload import QUESTIONS, Batch, Prompts, Request, Result, run_batch, send
from blink.bench.report import percentile as pct

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@dataclass(frozen=True)
class Plan:
    rounds: int  # repetitions of each one-at-a-time measurement
    itl_tokens: int  # max_tokens of the c1-100 requests (they give the inter-token latencies)
    ttft_tokens: int  # max_tokens where only the first token matters (c1-500, prefix-500)
    batch_tokens: int  # max_tokens of the c8 and c32 requests
    batch_requests: tuple[tuple[int, int], ...]  # (concurrency, number of requests)
    request_timeout_s: float
    phase_timeout_s: float


QUICK = Plan(
    rounds=2,
    itl_tokens=32,
    ttft_tokens=8,
    batch_tokens=16,
    batch_requests=((8, 8), (32, 32)),
    request_timeout_s=180,
    phase_timeout_s=300,
)
FULL = Plan(
    rounds=5,
    itl_tokens=128,
    ttft_tokens=16,
    batch_tokens=64,
    batch_requests=((8, 24), (32, 64)),
    request_timeout_s=600,
    phase_timeout_s=900,
)


@dataclass(frozen=True)
class Workload:
    warmup: list[Request]
    c1_100: list[Request]
    c1_500: list[Request]
    prefix: list[tuple[Request, Request]]
    batches: list[tuple[int, list[Request]]]


def build_workload(prompts: Prompts, plan: Plan) -> Workload:
    """Every request of a run, cut in a fixed order from the text, so every peer gets exactly the same ones."""
    warmup = [prompts.request(100, 8) for _ in range(10)]
    c1_100 = [prompts.request(100, plan.itl_tokens) for _ in range(plan.rounds)]
    c1_500 = [prompts.request(500, plan.ttft_tokens) for _ in range(plan.rounds)]
    prefix = []
    for _ in range(plan.rounds):
        first = prompts.request(500, plan.ttft_tokens, QUESTIONS[1])
        document = first.messages[0]["content"].rsplit("\n\n", 1)[0]
        prefix.append((first, prompts.request(500, plan.ttft_tokens, QUESTIONS[2], document=document)))
    batches = [(c, [prompts.request(100, plan.batch_tokens) for _ in range(n)]) for c, n in plan.batch_requests]
    return Workload(warmup, c1_100, c1_500, prefix, batches)


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def summarize_batch(batch: Batch) -> dict[str, Any]:
    ttfts = [r.ttft_s for r in batch.results if r.ttft_s is not None and r.error is None]
    tokens = sum(r.output_tokens for r in batch.results if r.error is None)
    return {
        "requests": len(batch.results),
        "ttft_p50_ms": ms(pct(ttfts, 0.5)),
        "ttft_p99_ms": ms(pct(ttfts, 0.99)),
        "output_tokens": tokens,
        "wall_s": round(batch.wall_s, 2),
        "output_tokens_per_s": round(tokens / batch.wall_s, 1) if batch.wall_s > 0 else None,
        "ttft_ms": [ms(t) for t in ttfts],
        "errors": [r.error for r in batch.results if r.error],
    }


def summarize_c1(results: list[Result]) -> dict[str, Any]:
    good = [r for r in results if r.error is None]
    ttfts = [r.ttft_s for r in good if r.ttft_s is not None]
    out: dict[str, Any] = {
        "ttft_median_ms": ms(statistics.median(ttfts)) if ttfts else None,
        "ttft_ms": [ms(t) for t in ttfts],
        "errors": [r.error for r in results if r.error],
    }
    gaps = [g for r in good for g in r.gaps_s]
    if gaps:
        decode = [(len(r.stamps) - 1) / (r.stamps[-1] - r.stamps[0]) for r in good if len(r.stamps) > 1]
        tokens, chunks = sum(r.output_tokens for r in good), sum(len(r.stamps) for r in good)
        out |= {
            "itl_median_ms": ms(pct(gaps, 0.5)),
            "itl_p90_ms": ms(pct(gaps, 0.9)),
            "itl_p99_ms": ms(pct(gaps, 0.99)),
            "itl_samples": len(gaps),
            "tokens_per_chunk": round(tokens / chunks, 2) if chunks else None,
            "decode_chunks_per_s": round(statistics.median(decode), 1) if decode else None,
            "output_tokens": [r.output_tokens for r in good],
            "tokens_from": sorted({r.tokens_from for r in good}),
            "first_answer": good[0].text[:200] if good else None,
        }
    return out


async def measure(server: Server, work: Workload, plan: Plan, prompts: Prompts, log: Any) -> dict[str, Any]:
    """Runs every phase against a ready server; a phase past plan.phase_timeout_s ends the peer's measurement."""
    out: dict[str, Any] = {}
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=plan.request_timeout_s, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        url = "/v1/chat/completions"

        async def one_at_a_time(reqs: list[Request]) -> list[Result]:
            return [await send(client, url, model, r, prompts, plan.request_timeout_s) for r in reqs]

        async def prefix_pairs() -> dict[str, Any]:
            firsts, seconds = [], []
            for a, b in work.prefix:
                firsts.append(await send(client, url, model, a, prompts, plan.request_timeout_s))
                seconds.append(await send(client, url, model, b, prompts, plan.request_timeout_s))
            return {"first": summarize_c1(firsts), "second": summarize_c1(seconds)}

        async def warm() -> dict[str, Any]:
            results = await one_at_a_time(work.warmup[:2])
            batch = await run_batch(client, url, model, work.warmup[2:], 8, prompts, plan.request_timeout_s)
            return {"errors": [r.error for r in results + batch.results if r.error]}

        phases: list[tuple[str, Any]] = [
            ("warmup", warm),
            ("c1_100", lambda: _c1(one_at_a_time, work.c1_100)),
            ("c1_500", lambda: _c1(one_at_a_time, work.c1_500)),
            ("prefix_500", prefix_pairs),
        ]
        for conc, reqs in work.batches:
            phases.append((f"c{conc}", lambda c=conc, r=reqs: _batch(client, url, model, r, c, prompts, plan)))
        for name, phase in phases:
            t0 = time.monotonic()
            log(f"  {name} ...")
            try:
                out[name] = await asyncio.wait_for(phase(), plan.phase_timeout_s)
            except TimeoutError:
                out[name] = {"errors": [f"phase timed out after {plan.phase_timeout_s:.0f} s"]}
                out["stopped_at"] = name
                break
            log(f"  {name}: {time.monotonic() - t0:.1f} s, errors: {len(out[name].get('errors', []))}")
    return out


async def _c1(one_at_a_time: Any, reqs: list[Request]) -> dict[str, Any]:
    return summarize_c1(await one_at_a_time(reqs))


async def _batch(
    client: httpx.AsyncClient, url: str, model: str, reqs: list[Request], concurrency: int, prompts: Prompts, plan: Plan
) -> dict[str, Any]:
    return summarize_batch(await run_batch(client, url, model, reqs, concurrency, prompts, plan.request_timeout_s))


def run_peer(
    name: str, env: Env, port: int, work: Workload, plan: Plan, prompts: Prompts, logs: Path
) -> dict[str, Any]:
    peer = PEERS[name]
    out: dict[str, Any] = {"peer": name, "describe": peer.describe, "load_avg_before": os.getloadavg()}
    if problem := install_problem(peer, env):
        return out | {"status": f"did not start: {problem}"}
    out["version"] = version(peer, env)
    with Server(peer, env, port, logs / f"peers-{name}.log") as server:
        out["command"] = shlex.join(server.argv)
        out["server_log"] = os.path.relpath(server.log, REPO)
        try:
            out["start_s"] = round(server.wait_ready(), 1)
        except DidNotStart as e:
            return out | {"status": f"did not start: {e}"}
        _log(f"{name}: ready after {out['start_s']} s ({out['version']})")
        out["phases"] = asyncio.run(measure(server, work, plan, prompts, _log))
        assert server.memory is not None
        server.stop()
        out["peak_rss_mb"] = round(server.memory.peak_mb, 1)
        out["max_tree_rss_mb"] = round(server.memory.max_tree_rss_kb / 1024, 1)
        out["processes_seen"] = len(server.memory.hwm_kb)
    stopped = out["phases"].get("stopped_at")
    out["status"] = f"incomplete: {stopped} timed out" if stopped else "ok"
    return out


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    try:
        torch = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_blink_venv": torch, "python": sys.version.split()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--peers", default="blink,llamacpp,llamaserver,vllm,hf", help=f"comma-separated, from: {', '.join(PEERS)}"
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (fewer, shorter requests)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="compute threads for every peer")
    parser.add_argument("--blink-bin", type=Path, default=REPO / ".venv/bin/blink")
    parser.add_argument("--blink-args", default="", help='flags appended to `blink serve`, e.g. "--weights int8"')
    parser.add_argument(
        "--extra-args",
        action="append",
        default=[],
        metavar='PEER="FLAGS"',
        help="flags appended to that peer's server command (repeatable)",
    )
    parser.add_argument("--venvs", type=Path, default=HERE / ".venvs")
    parser.add_argument("--hf-model", type=Path, default=HERE / ".cache/smollm2-135m-instruct-hf")
    parser.add_argument("--port", type=int, default=18100, help="first port; peer i listens on port + i")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()

    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    if unknown := [n for n in names if n not in PEERS]:
        parser.error(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    extra = {"blink": shlex.split(args.blink_args)}
    for item in args.extra_args:
        peer, _, flags = item.partition("=")
        extra[peer] = extra.get(peer, []) + shlex.split(flags)
    if not (args.hf_model / "tokenizer.json").is_file():
        sys.exit(f"{args.hf_model} is missing: run benchmarks/peers/setup.sh model")

    from blink.models import registry

    env = Env(
        REPO,
        args.venvs,
        registry.get("smollm2-135m-instruct").locate(),
        args.hf_model,
        args.threads,
        args.blink_bin,
        extra,
    )
    plan = QUICK if args.quick else FULL
    prompts = Prompts.load(args.hf_model)
    work = build_workload(prompts, plan)
    started = datetime.now(UTC)
    command = shlex.join([os.path.relpath(sys.executable, REPO), os.path.relpath(__file__, REPO), *sys.argv[1:]])
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "quick": args.quick,
        "command": command,
        "threads": args.threads,
        "plan": asdict(plan),
        **machine(),
        "prompt_tokens": {
            "c1_100": [r.prompt_tokens for r in work.c1_100],
            "c1_500": [r.prompt_tokens for r in work.c1_500],
            "prefix_500": [(a.prompt_tokens, b.prompt_tokens) for a, b in work.prefix],
            "batch": [r.prompt_tokens for _, rs in work.batches for r in rs][:4],
        },
    }
    results = []
    for i, name in enumerate(names):
        _log(f"== {name}")
        t0 = time.monotonic()
        results.append(run_peer(name, env, args.port + i, work, plan, prompts, args.out))
        results[-1]["measured_s"] = round(time.monotonic() - t0, 1)
        _log(f"== {name}: {results[-1]['status']} ({results[-1]['measured_s']} s)")
    meta["finished"] = datetime.now(UTC).isoformat(timespec="seconds")

    table = report.markdown(meta, results)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"peers-{started.date().isoformat()}{'-quick' if args.quick else ''}"
    stem.with_suffix(".md").write_text(table)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "peers": results}, indent=1) + "\n")
    _log(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
