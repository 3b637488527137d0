"""Failover under load: does a greedy stream survive its worker being killed, with nothing lost and nothing twice?

One Redis, one gateway-only `blink serve --redis --no-local-replica`, two `blink worker` processes (each with
--worker-threads torch threads: two workers share this machine's cores).

reference  each prompt's greedy text (temperature 0, --max-tokens, semantic cache off), streamed on the undisturbed
           system, --streams at a time (the engine is batch-invariant, so concurrency does not change a text).
load       --streams clients stream chat completions for --duration seconds, each looping over the prompts.
killer     every --kill-every seconds, once every live worker is READY (per the gateway's /readyz), kill -9 the
           one that has been ready longest and start its replacement at once; so one worker is always alive and a
           killed worker's requests can be taken over (after the heartbeat timeout, 10 s) by the other. If the
           replacement is not ready yet when a kill is due, the kill waits for it. With --no-wait-ready the kills
           keep to the clock instead and may take the last ready worker: what then happens when none is left.
Each response is one of: completed (its text is compared with the reference: identical means no token lost and
none twice), error (an error event, or an HTTP error status once streaming), hung (nothing received for --timeout
seconds; a failover is silent for the heartbeat timeout plus the regeneration of what the client already has), or
refused (an HTTP error before streaming: 503 while no worker is ready). lost = error + hung. A response counts as
taken over when the gateway's log says it continued on another worker.

  python -m benchmarks.failover [--duration 60 --kill-every 10 --streams 8] [--no-wait-ready]
                                [--out benchmarks/results]    (from the repository root)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import PROMPTS, machine, write_report
from tests.e2e.conftest import MODEL, Server
from tests.redis_server import RedisServer

READY_POLL_S = 0.2


@dataclass
class Outcome:
    client: int
    prompt: int
    status: str  # completed | error | hung | refused
    text: str = ""
    request_id: str | None = None
    ttft_s: float | None = None
    total_s: float = 0.0
    started_s: float = 0.0  # since the load began
    error: str = ""


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path
    started: float
    replica_id: str | None = None
    ready_at: float | None = None  # when /readyz first showed it READY
    killed_at: float | None = None

    def find_id(self) -> str | None:
        if self.replica_id is None:
            match = re.search(r"replica (replica-[0-9a-f]+): ", self.log.read_text(errors="replace"))
            self.replica_id = match.group(1) if match else None
        return self.replica_id


@dataclass
class Workers:
    url: str
    threads: int
    logs: Path
    all: list[Worker] = field(default_factory=list)

    def start(self) -> Worker:
        log = self.logs / f"worker{len(self.all)}.log"
        cmd = [sys.executable, "-m", "blink.cli", "worker", "--redis", self.url, "--warmup-steps", "1"]
        cmd += ["--threads", str(self.threads)]
        with log.open("wb") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
        worker = Worker(proc, log, time.monotonic())
        self.all.append(worker)
        return worker

    def alive(self) -> list[Worker]:
        return [w for w in self.all if w.proc.poll() is None]

    async def note_ready(self, http: httpx.AsyncClient) -> list[Worker]:
        """The live workers the gateway hears as READY (recording when each was first seen so)."""
        try:
            replicas = (await http.get("/readyz", timeout=5)).json().get("replicas", [])
        except (httpx.HTTPError, ValueError):
            return []
        ready = {r["id"] for r in replicas if r["state"] == "ready"}
        out = []
        for w in self.alive():
            if w.find_id() in ready:
                w.ready_at = w.ready_at or time.monotonic()
                out.append(w)
        return out

    def stop(self) -> None:
        for w in self.all:
            if w.proc.poll() is None:
                w.proc.terminate()
        for w in self.all:
            try:
                w.proc.wait(30)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()


async def stream(http: httpx.AsyncClient, prompt: str, max_tokens: int, timeout: float) -> Outcome:
    """One streamed greedy chat completion, classified (client and prompt are filled in by the caller)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "cache": False,
    }
    out = Outcome(-1, -1, "hung")
    start = time.monotonic()
    parts: list[str] = []
    loop = asyncio.get_running_loop()
    try:
        async with (
            asyncio.timeout(timeout) as silence,
            http.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            if response.status_code != 200:
                out.status, out.error = "refused", f"{response.status_code}: {(await response.aread())[:200]!r}"
                return out
            async for line in response.aiter_lines():
                silence.reschedule(loop.time() + timeout)
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    if out.status == "hung":  # no error event came first
                        out.status = "completed"
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.status, out.error = "error", str(chunk["error"].get("message"))
                    continue
                out.request_id = chunk.get("id", out.request_id)
                for choice in chunk.get("choices", []):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        out.ttft_s = out.ttft_s or time.monotonic() - start
                        parts.append(text)
            else:
                out.status, out.error = "error", "the stream ended without [DONE]"
    except TimeoutError:
        out.status, out.error = "hung", f"nothing received for {timeout:.0f} s"
    except httpx.HTTPError as exc:
        out.status, out.error = "error", f"{type(exc).__name__}: {exc}"
    finally:
        out.text = "".join(parts)
        out.total_s = time.monotonic() - start
    return out


async def references(http: httpx.AsyncClient, prompts: list[str], args: argparse.Namespace) -> list[str]:
    gate = asyncio.Semaphore(args.streams)

    async def one(prompt: str) -> Outcome:
        async with gate:
            return await stream(http, prompt, args.max_tokens, args.timeout)

    done = await asyncio.gather(*(one(p) for p in prompts))
    bad = [(i, o.status, o.error) for i, o in enumerate(done) if o.status != "completed"]
    if bad:
        raise RuntimeError(f"the undisturbed reference run failed: {bad}")
    return [o.text for o in done]


async def load(
    http: httpx.AsyncClient, prompts: list[str], workers: Workers, args: argparse.Namespace
) -> tuple[list[Outcome], list[dict[str, Any]]]:
    began = time.monotonic()
    end = began + args.duration
    outcomes: list[Outcome] = []
    kills: list[dict[str, Any]] = []

    async def client(i: int) -> None:
        k = 2 * i  # clients start at different prompts
        while time.monotonic() < end:
            p = k % len(prompts)
            k += 1
            started = time.monotonic() - began
            out = await stream(http, prompts[p], args.max_tokens, args.timeout)
            out.client, out.prompt, out.started_s = i, p, started
            outcomes.append(out)
            if out.status == "refused":
                await asyncio.sleep(0.5)

    async def killer() -> None:
        next_kill = began + args.kill_every
        while True:
            await asyncio.sleep(max(0.0, next_kill - time.monotonic()))
            if time.monotonic() >= end:
                return
            ready = await workers.note_ready(http)
            # --wait-ready: the replacement is still loading, so killing now could leave no worker ready
            while args.wait_ready and (len(ready) < len(workers.alive()) or len(ready) < 2):
                if time.monotonic() >= end:
                    kills.append({"due_s": round(next_kill - began, 1), "done": False})
                    return
                await asyncio.sleep(READY_POLL_S)
                ready = await workers.note_ready(http)
            # the one ready longest; with --no-wait-ready possibly one still loading, if no other is left
            victim = min(workers.alive(), key=lambda w: (w.ready_at is None, w.ready_at or w.started))
            victim.proc.kill()
            victim.killed_at = now = time.monotonic()
            workers.start()  # the replacement
            kills.append(
                {
                    "due_s": round(next_kill - began, 1),
                    "done": True,
                    "at_s": round(now - began, 1),
                    "killed": victim.replica_id,
                    "ready_left": sum(w is not victim for w in ready),
                }
            )
            next_kill = now + args.kill_every if args.wait_ready else next_kill + args.kill_every

    async def watch_ready() -> None:  # ready_at of each replacement, as soon as it is READY
        while time.monotonic() < end:
            await workers.note_ready(http)
            await asyncio.sleep(READY_POLL_S)

    watcher = asyncio.create_task(watch_ready())
    kill_task = asyncio.create_task(killer())
    await asyncio.gather(*(client(i) for i in range(args.streams)))
    kill_task.cancel()
    watcher.cancel()
    await asyncio.gather(kill_task, watcher, return_exceptions=True)
    return outcomes, kills


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def spread(values: list[float]) -> str:
    return f"{pct(values, 0.5):.1f} / {max(values):.1f}" if values else "-"


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def report(
    args: argparse.Namespace,
    refs: list[str],
    outcomes: list[Outcome],
    kills: list[dict[str, Any]],
    workers: Workers,
) -> tuple[str, dict[str, Any]]:
    logs = workers.logs
    gateway_log = (logs / "gateway.log").read_text(errors="replace")
    continued = re.findall(r"response (\S+) continues on ", gateway_log)  # one line per failover of a response
    taken_over = set(continued)
    worker_logs = "".join(p.read_text(errors="replace") for p in sorted(logs.glob("worker*.log")))
    claimed = sum(int(n) for n in re.findall(r"took over (\d+) request", worker_logs))
    by = {s: [o for o in outcomes if o.status == s] for s in ("completed", "error", "hung", "refused")}
    mismatched = [o for o in by["completed"] if o.text != refs[o.prompt]]
    over = [o for o in outcomes if o.request_id in taken_over]
    lost = len(by["error"]) + len(by["hung"])
    ttfts = [o.ttft_s * 1000 for o in outcomes if o.ttft_s is not None]
    calm = [o.ttft_s * 1000 for o in outcomes if o.ttft_s is not None and o.request_id not in taken_over]
    done = [k for k in kills if k["done"]]
    calm_total = [o.total_s for o in by["completed"] if o.request_id not in taken_over]
    over_total = [o.total_s for o in by["completed"] if o.request_id in taken_over]
    # how long each replacement took from its start to READY, while the other worker served the load
    loading = [round(w.ready_at - w.started, 1) for w in workers.all[2:] if w.ready_at is not None]
    figures = {
        "responses": len(outcomes),
        "completed": len(by["completed"]),
        "identical_to_reference": len(by["completed"]) - len(mismatched),
        "mismatches": len(mismatched),
        "errors": len(by["error"]),
        "hung": len(by["hung"]),
        "lost": lost,
        "refused": len(by["refused"]),
        "kills": len(done),
        "kills_due_not_done": len(kills) - len(done),
        "replacement_ready_after_s": loading,
        "failovers": len(continued),
        "taken_over_responses": len(over),
        "taken_over_completed_identical": sum(1 for o in over if o.status == "completed" and o.text == refs[o.prompt]),
        "requests_claimed_by_workers": claimed,
        "ttft_p50_ms": pct(ttfts, 0.5),
        "ttft_p99_ms": pct(ttfts, 0.99),
        "ttft_p50_ms_not_taken_over": pct(calm, 0.5),
        "ttft_p99_ms_not_taken_over": pct(calm, 0.99),
        "ttft_max_ms": max(ttfts, default=float("nan")),
        "response_s_p50_max_not_taken_over": spread(calm_total),
        "response_s_p50_max_taken_over": spread(over_total),
    }
    command = (
        f"python -m benchmarks.failover --duration {args.duration:g} --kill-every {args.kill_every:g} "
        f"--streams {args.streams} --max-tokens {args.max_tokens} --worker-threads {args.worker_threads}"
        + ("" if args.wait_ready else " --no-wait-ready")
    )
    policy = (
        "once both workers are READY (a kill waits for the replacement), the one ready longest is killed"
        if args.wait_ready
        else "whether or not the replacement is ready yet, the oldest live worker is killed"
    )
    f = figures
    lines = [
        "# Failover under load: workers killed (kill -9) while streams run",
        "",
        machine(),
        f"Command: `{command}`",
        "",
        f"One Redis, a gateway-only `blink serve --redis --no-local-replica`, two `blink worker --threads "
        f"{args.worker_threads}`; {args.streams} clients stream greedy chat completions ({len(refs)} prompts, "
        f"max_tokens {args.max_tokens}, semantic cache off) for {args.duration:g} s; every {args.kill_every:g} s, "
        f"{policy} (kill -9) and a replacement started at once. "
        f"1-minute load average {args.load_before:.1f} before the load, {args.load_after:.1f} at its end.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| responses (completed / error / hung / refused) | {f['responses']} ({f['completed']} / {f['errors']} / "
        f"{f['hung']} / {f['refused']}) |",
        f"| completed and identical to the undisturbed run | {f['identical_to_reference']} of {f['completed']} |",
        f"| mismatches (a lost or repeated token shows here) | {f['mismatches']} |",
        f"| lost (error or hung) | {f['lost']} |",
        f"| workers killed (due but not done: the replacement was not ready before the end) | {f['kills']} "
        f"(at {', '.join(str(k['at_s']) for k in done) or '-'} s; {f['kills_due_not_done']}) |",
        f"| a replacement worker READY after (s) | {', '.join(map(str, loading)) or '-'} |",
        f"| failovers: a response continued on another worker (responses; of them completed identical) | "
        f"{f['failovers']} ({f['taken_over_responses']}; {f['taken_over_completed_identical']}); workers "
        f"claimed {f['requests_claimed_by_workers']} requests |",
        f"| TTFT p50 / p99 / max, all responses (ms) | {f['ttft_p50_ms']:.0f} / {f['ttft_p99_ms']:.0f} / "
        f"{f['ttft_max_ms']:.0f} |",
        f"| TTFT p50 / p99, responses not taken over (ms) | {f['ttft_p50_ms_not_taken_over']:.0f} / "
        f"{f['ttft_p99_ms_not_taken_over']:.0f} |",
        f"| time to the last token p50 / max, completed: not taken over; taken over (s) | {spread(calm_total)}; "
        f"{spread(over_total)} |",
    ]
    met = f["lost"] == 0 and f["mismatches"] == 0 and f["refused"] == 0
    lines += [
        "",
        "Target (zero lost responses, zero duplicated tokens, every greedy text identical to an undisturbed run): "
        + ("**met**." if met else "**not met**."),
    ]
    if done:
        left = ", ".join(str(k["ready_left"]) for k in done)
        lines += [
            "",
            f"Workers READY (besides the victim) at each kill: {left}. A failover starts once the dead worker's "
            "heartbeat is older than the heartbeat timeout (10 s): the survivor then claims its requests and starts "
            "them again from the prompt, and the gateway swallows the regenerated text the client already has, so a "
            "taken-over response is silent for 10 s plus that regeneration. The survivor then holds every stream, so "
            "the next kill's victim (the worker ready longest) holds them all again: a response can be taken over "
            "at each kill, which is what its time to the last token shows.",
        ]
    refused = [o.started_s for o in by["refused"]]
    if refused:
        lines += [
            "",
            f"{len(refused)} requests were refused (503: no worker ready; each client retried 0.5 s later) "
            f"between t={min(refused):.1f} and {max(refused):.1f} s.",
        ]
    problems = [*by["error"], *by["hung"], *mismatched]
    if problems:
        lines += ["", "Responses that did not complete identically:", ""]
        for o in problems[:20]:
            what = o.error or f"text differs from char {first_difference(o.text, refs[o.prompt])}"
            over_mark = " (taken over)" if o.request_id in taken_over else ""
            lines.append(f"- t={o.started_s:.1f} s client {o.client} prompt {o.prompt} {o.status}{over_mark}: {what}")
    data = {"figures": figures, "kills": kills, "outcomes": [asdict(o) for o in outcomes], "references": refs}
    return "\n".join(lines) + "\n", data


async def run(args: argparse.Namespace, gateway: Server, workers: Workers) -> tuple[list[str], Any]:
    prompts = PROMPTS[: args.prompts]
    async with httpx.AsyncClient(base_url=gateway.base, timeout=args.timeout + 30) as http:  # ours fires first
        deadline = time.monotonic() + 300
        while len(await workers.note_ready(http)) < 2:
            if time.monotonic() > deadline or not workers.alive():
                raise RuntimeError("the two workers did not become ready")
            await asyncio.sleep(0.5)
        refs = await references(http, prompts, args)
        args.load_before = os.getloadavg()[0]  # another user of the machine shows here
        outcomes, kills = await load(http, prompts, workers, args)
        args.load_after = os.getloadavg()[0]
        return refs, (outcomes, kills)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--kill-every", type=float, default=10.0, help="seconds between kills")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streaming clients")
    parser.add_argument("--prompts", type=int, default=16, help="prompts of benchmarks/common.py used")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--worker-threads", type=int, default=1, help="torch threads of each worker")
    parser.add_argument("--timeout", type=float, default=60.0, help="a response silent this long is hung")
    parser.add_argument(
        "--wait-ready",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a kill waits until the replacement is READY (off: kill on time, even the last ready worker)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="blink-failover-"))
    with RedisServer() as redis:
        workers = Workers(redis.url, args.worker_threads, logs)
        workers.start()
        workers.start()
        gateway = Server(logs / "gateway.log", "--redis", redis.url, "--no-local-replica")
        try:
            gateway.wait_ready()
            refs, (outcomes, kills) = asyncio.run(run(args, gateway, workers))
        finally:
            workers.stop()
            gateway.stop()
    markdown, data = report(args, refs, outcomes, kills, workers)
    write_report(args.out, "failover" if args.wait_ready else "failover-no-wait-ready", markdown, data)
    print(f"logs: {logs}")


if __name__ == "__main__":
    main()
