"""Loading and serving a user's GGUF: blink vs llama.cpp's llama-server on the same file (issue 20's proof).

For each GGUF (default: SmolLM2-135M-Instruct, bundled, and Qwen2.5-Coder-1.5B-Instruct Q4_K_M), blink is given
the file by its path (`blink serve --model /path/to/file.gguf`) and llama-server reads the same file; they run
one after the other (never together), with the same number of threads, on 127.0.0.1. A second blink row,
`--speculative off`, is the control for decode speed (blink's default prompt-lookup speculation gains on text
that repeats itself; llama-server does not speculate by default).

  prepare s       blink: wall time of a fresh Python process running `loader.prepare(PATH)` into an empty cache
                  folder (the one-time dequantization into fp32 safetensors + the tokenizer files). `blink prepare`
                  also exports the semantic cache's embedding model; that part is timed apart (it is the same for
                  every model). llama-server: 0, it reads the GGUF itself.
  start -> ready  process started -> its ready path answers 200. blink's /readyz: after loading, quantising to
                  w8a8 and warming up (warm-up generations and the decode step costs it measures); llama-server's
                  /health: after loading (and its own one-token warm-up).
  peak RSS        the server process's VmHWM (its peak resident memory) after the measurements.
  prefill tok/s   each server's own timing of a ~500-token prose prompt (Wikipedia text, a different passage per
                  request, so no prefix-cache hit), median of --repeats after one untimed request.
  decode tok/s    each server's own timing of 128 forced tokens (ignore_eos), temperature 0, one stream:
                  (tokens - 1) / (last token - first token).

    python benchmarks/models.py [--models NAME_OR_GGUF ...] [--threads 2] [--repeats 3] [--no-control]
                                [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write_report
from benchmarks.peers.servers import DidNotStart, Env, Launch, Peer, Server, version
from blink.models import source
from blink.models.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct")
TEXT = REPO / "benchmarks/peers/data/elephant.txt"  # GFDL Wikipedia text, see benchmarks/peers/data/SOURCE.md
VENVS = REPO / "benchmarks/peers/.venvs"
LLAMA_SERVER = VENVS / "llamaserver/bin/llama-server"
BLINK = Path(sys.executable).with_name("blink")
REQUEST_TIMEOUT_S = 900
# a fresh process, so the figure includes what a user waits for: Python, torch and blink's imports
PREPARE = (
    "import sys, time; from pathlib import Path; from blink.models import loader, source; "
    "t = time.perf_counter(); print(loader.prepare(source.resolve(sys.argv[1]), Path(sys.argv[2]), "
    "progress=False)); print(time.perf_counter() - t)"
)


@dataclass(frozen=True)
class Setup:
    threads: int
    repeats: int
    prompt_tokens: int
    max_tokens: int
    logs: Path
    no_repack: bool  # the CPU has AMX: llama-server's repacked weights would take another path than on AVX2
    blink_rows: dict[str, list[str]]  # row name -> flags added to `blink serve`


@dataclass(frozen=True)
class Sample:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    prefill_tps: float
    decode_tps: float
    extra: dict[str, Any]


Ask = Callable[[httpx.Client, str, str, Setup], Sample]


def code_state() -> str:
    """The commit measured, and the source files that differ from it (the benchmark runs the working tree)."""
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    diff = subprocess.run([*git, "status", "--porcelain", "src"], capture_output=True, text=True).stdout.split()
    changed = [f for f in diff if f.startswith("src/")]
    return head + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def has_amx() -> bool:
    return "amx" in Path("/proc/cpuinfo").read_text()


def prepare(gguf: Path, cache: Path) -> dict[str, Any]:
    """blink's one-time preparation of `gguf` into the empty `cache`, timed; then `blink prepare` on the same
    (now prepared) folder, which leaves only the embedding model's export to do."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", PREPARE, str(gguf), str(cache)], capture_output=True, text=True, check=True
    )
    wall = time.perf_counter() - t0
    folder, in_process = out.stdout.split()[-2:]
    t0 = time.perf_counter()
    subprocess.run(
        [str(BLINK), "prepare", "--model", str(gguf), "--cache-dir", str(cache)], capture_output=True, check=True
    )
    return {
        "prepare_s": round(wall, 2),
        "prepare_in_process_s": round(float(in_process), 2),
        "cli_embedder_export_s": round(time.perf_counter() - t0, 2),
        "folder": folder,
        "prepared_mib": round(sum(f.stat().st_size for f in Path(folder).iterdir()) / 2**20),
    }


def passages(tokenizer: Tokenizer, count: int, target: int) -> list[str]:
    """`count` consecutive passages of the text, each the most whole words that make at most `target` tokens."""
    words = TEXT.read_text().split()
    out, start = [], 0
    for _ in range(count):
        lo, hi = 1, min(4 * target, len(words) - start)
        while lo < hi:  # the largest word count whose text fits
            mid = (lo + hi + 1) // 2
            if len(tokenizer.encode(" ".join(words[start : start + mid]))) <= target:
                lo = mid
            else:
                hi = mid - 1
        out.append(" ".join(words[start : start + lo]))
        start += lo
    return out


def blink_peer(name: str, gguf: Path, cache: Path, flags: list[str]) -> Peer:
    def launch(env: Env, port: int) -> Launch:
        argv = [str(BLINK), "serve", "--model", str(gguf), "--cache-dir", str(cache), "--host", "127.0.0.1"]
        return Launch([*argv, "--port", str(port), "--threads", str(env.threads), "--no-semantic-cache", *flags], {})

    return Peer(name, "blink serve --model PATH", "/readyz", 1800, launch, lambda env: [str(BLINK), "--version"])


def llama_peer(gguf: Path, no_repack: bool) -> Peer:
    def launch(env: Env, port: int) -> Launch:
        threads = str(env.threads)
        argv = [str(LLAMA_SERVER), "-m", str(gguf), "-t", threads, "-tb", threads, "-c", "4096", "-np", "1"]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--no-webui"]
        return Launch(argv + (["--no-repack"] if no_repack else []), {})

    return Peer("llama-server", "llama.cpp", "/health", 600, launch, lambda env: [str(LLAMA_SERVER), "--version"])


def ask_blink(client: httpx.Client, url: str, prompt: str, setup: Setup) -> Sample:
    model = client.get(f"{url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": prompt, "max_tokens": setup.max_tokens, "temperature": 0}
    r = client.post(f"{url}/v1/completions", json=body | {"ignore_eos": True, "cache": False})
    r.raise_for_status()
    t, u = r.json()["timings"], r.json()["usage"]
    n = u["completion_tokens"]
    return Sample(
        u["prompt_tokens"],
        u["prompt_tokens_details"]["cached_tokens"],
        n,
        u["prompt_tokens"] / (t["prefill_ms"] / 1000),  # prefill_ms: first scheduled -> first token
        (n - 1) / (t["decode_ms"] / 1000),  # decode_ms: first token -> finished
        {k: t[k] for k in ("queue_ms", "prefill_ms", "decode_ms", "speculative", "ttft_ms", "total_ms")},
    )


def ask_llama(client: httpx.Client, url: str, prompt: str, setup: Setup) -> Sample:
    body = {"prompt": prompt, "n_predict": setup.max_tokens, "temperature": 0}
    r = client.post(f"{url}/completion", json=body | {"cache_prompt": False, "ignore_eos": True})
    r.raise_for_status()
    t = r.json()["timings"]
    # prompt_per_second = prompt_n / prompt_ms; predicted_per_second = (predicted_n - 1) / predicted_ms (this build)
    extra = {k: t[k] for k in ("prompt_ms", "predicted_ms", "cache_n")}
    return Sample(
        t["prompt_n"], t["cache_n"], t["predicted_n"], t["prompt_per_second"], t["predicted_per_second"], extra
    )


def wait_ready(server: Server, t0: float) -> float:
    """Seconds from `t0` (just before the process started) until the ready path answers 200. Raises DidNotStart."""
    assert server.proc is not None
    with httpx.Client(timeout=2) as client:
        while (elapsed := time.monotonic() - t0) < server.peer.start_timeout_s:
            if (rc := server.proc.poll()) is not None:
                raise DidNotStart(f"exited with status {rc} while starting: {server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(server.base_url + server.peer.ready_path).status_code == 200:
                    return time.monotonic() - t0
            time.sleep(0.05 if elapsed < 5 else 0.25)  # fine while a fast server starts, light on a slow one
    raise DidNotStart(f"not ready after {server.peer.start_timeout_s:.0f} s: {server.log_tail()}")


def memory(pid: int) -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {f"{k}_mib": round(int(fields[k].split()[0]) / 1024, 1) for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


def measure(url: str, ask: Ask, prompts: list[str], setup: Setup) -> dict[str, Any]:
    """One untimed request, then one per remaining prompt; the medians of the servers' own figures."""
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        ask(client, url, prompts[0], setup)
        samples = [ask(client, url, p, setup) for p in prompts[1:]]
    if any(s.completion_tokens != setup.max_tokens or s.cached_tokens for s in samples):
        raise ValueError(f"not {setup.max_tokens} fresh tokens each: {samples}")
    return {
        "prefill_tps": round(statistics.median(s.prefill_tps for s in samples), 1),
        "decode_tps": round(statistics.median(s.decode_tps for s in samples), 1),
        "samples": [asdict(s) for s in samples],
    }


def run_server(peer: Peer, gguf: Path, ask: Ask, prompts: list[str], setup: Setup) -> dict[str, Any]:
    env = Env(REPO, VENVS, gguf, Path(), setup.threads, BLINK)
    log = setup.logs / f"models-{gguf.stem}-{peer.name.replace(' ', '')}.log"
    out: dict[str, Any] = {"server": peer.name, "version": version(peer, env)}
    print(f"== {gguf.name}: {peer.name}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    with Server(peer, env, free_port(), log) as server:
        assert server.proc is not None
        out |= {"command": shlex.join(server.argv), "log": os.path.relpath(log, REPO)}
        try:
            out["ready_s"] = round(wait_ready(server, t0), 2)
            out |= measure(server.base_url, ask, prompts, setup)
            out |= memory(server.proc.pid)
            out["status"] = "ok"
        except (DidNotStart, httpx.HTTPError, KeyError, ValueError) as e:
            out["status"] = f"failed: {type(e).__name__}: {e}"[:600]
    assert server.memory is not None
    out["tree_peak_mib"] = round(server.memory.peak_mb, 1)  # sum of each process's VmHWM in the tree
    if peer.name.startswith("blink"):
        out |= blink_log(log)
    print(f"== {peer.name}: {out['status']}", file=sys.stderr, flush=True)
    return out


def blink_log(log: Path) -> dict[str, Any]:
    """The kernel line, and how long the replica warmed up, from blink's log."""
    text = log.read_text(errors="replace")
    out: dict[str, Any] = {}
    if m := re.search(r"^.*w8a8 layers run on.*$", text, re.M):
        out["kernel_line"] = m.group(0)
    stamps = {}
    for state in ("warming", "ready"):
        if m := re.search(rf"^(\S+ \S+) INFO blink\.worker: replica \S+: {state}$", text, re.M):
            stamps[state] = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
    if len(stamps) == 2:
        out["warmup_s"] = round((stamps["ready"] - stamps["warming"]).total_seconds(), 2)
    return out


def run_model(spec: str, setup: Setup, scratch: Path) -> dict[str, Any]:
    gguf = source.resolve(spec).locate()
    out: dict[str, Any] = {"model": gguf.stem, "gguf": str(gguf), "gguf_mib": round(gguf.stat().st_size / 2**20)}
    cache = Path(tempfile.mkdtemp(prefix="blink-models-", dir=scratch))
    try:
        print(f"== {gguf.name}: blink prepare into {cache}", file=sys.stderr, flush=True)
        try:
            out["prepare"] = prepare(gguf, cache)
        except subprocess.CalledProcessError as e:
            out["error"] = f"blink could not prepare it: {(e.stderr or '').strip()[-400:]}"
            return out
        tokenizer = Tokenizer.from_folder(Path(out["prepare"]["folder"]))
        prompts = passages(tokenizer, setup.repeats + 1, setup.prompt_tokens)
        out["prompt_tokens_blink_tokenizer"] = [len(tokenizer.encode(p)) for p in prompts]
        out["servers"] = [
            run_server(blink_peer(name, gguf, cache, flags), gguf, ask_blink, prompts, setup)
            for name, flags in setup.blink_rows.items()
        ]
        out["servers"].append(run_server(llama_peer(gguf, setup.no_repack), gguf, ask_llama, prompts, setup))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return out


def versions(results: list[dict[str, Any]]) -> str:
    seen = {row["server"].split()[0]: row["version"] for r in results for row in r.get("servers", [])}
    return "; ".join(f"{name}: {v}" for name, v in seen.items())


def _cell(row: dict[str, Any], key: str, digits: int = 1) -> str:
    value = row.get(key)
    return "–" if value is None else f"{value:.{digits}f}"


def table(results: list[dict[str, Any]], setup: Setup) -> list[str]:
    lines = [
        "| model | server | prepare s | start -> ready s | peak RSS MiB | prefill tok/s "
        f"(~{setup.prompt_tokens}-token prompt) | decode tok/s (1 stream, {setup.max_tokens} tokens) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for row in r.get("servers", []):
            name = row["server"]
            if name.startswith("blink"):
                prep = _cell(r["prepare"], "prepare_s") if name == "blink" else "(the same folder)"
            else:
                prep = "0 (reads the GGUF)"
            keys = [("ready_s", 1), ("VmHWM_mib", 0), ("prefill_tps", 1), ("decode_tps", 1)]
            cells = [_cell(row, key, digits) for key, digits in keys]
            server = name + (" (--no-repack: AMX CPU)" if name == "llama-server" and setup.no_repack else "")
            lines.append(f"| {r['model']} | {server} | {prep} | " + " | ".join(cells) + " |")
    return lines


def notes(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"- **{r['model']}**: not measured: {r['error']}")
            continue
        p = r["prepare"]
        lines.append(
            f"- **{r['model']}** ({r['gguf_mib']} MiB GGUF): blink prepare {p['prepare_s']} s wall "
            f"({p['prepare_in_process_s']} s in `loader.prepare`, the rest Python/torch start-up), "
            f"{p['prepared_mib']} MiB of fp32 safetensors written; `blink prepare` would add "
            f"{p['cli_embedder_export_s']} s exporting the embedding model."
        )
        lines += [f"  - {row_note(row)}" for row in r["servers"]]
    return lines


def row_note(row: dict[str, Any]) -> str:
    samples = row.get("samples", [])
    text = (
        f"{row['server']}: {row['status']}; prompt tokens per timed request {[s['prompt_tokens'] for s in samples]}; "
        f"RSS at the end {row.get('VmRSS_mib')} MiB"
    )
    if row["server"].startswith("blink"):
        text += (
            f"; warm-up {row.get('warmup_s')} s of the start -> ready; speculative proposed/accepted per request "
            f"{[(s['extra']['speculative']['proposed'], s['extra']['speculative']['accepted']) for s in samples]}"
        )
        if "kernel_line" in row:
            text += f"; log: `{row['kernel_line'].split(' INFO ', 1)[-1]}`"
    return text + "."


CAVEATS = [
    "- blink's start -> ready includes its warm-up: /readyz answers 200 only after the replica has run warm-up "
    "generations and measured its decode step costs (the `warm-up` figure below); llama-server's /health is 200 "
    "once the model is loaded.",
    "- blink serves with its defaults but `--no-semantic-cache`: w8a8 weights, a 512 MiB paged KV cache, prefix "
    "caching (bypassed: every prompt is new), ngram speculative decoding (adaptive: it proposes only where its "
    "measured acceptance pays). Its RSS is the one `blink serve` process: gateway, bus and replica together. "
    "llama-server: its GGUF weights as they are, `-c 4096 -np 1` (one slot), no speculative decoding.",
    "- `blink --speculative off` is the control row: the same server without prompt-lookup speculation, "
    "the kernels' own decode speed (prose at temperature 0 soon repeats itself, which prompt lookup exploits).",
    "- Both servers tokenize the same text with the same GGUF vocabulary; the prompt token counts they report are "
    "listed per model below.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="bundled names or .gguf paths")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()), help="for the fresh caches")
    parser.add_argument("--no-control", action="store_true", help="no `blink --speculative off` row")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()
    rows = {"blink": [], **({} if args.no_control else {"blink --speculative off": ["--speculative", "off"]})}
    setup = Setup(args.threads, args.repeats, args.prompt_tokens, args.max_tokens, args.out, has_amx(), rows)
    code = code_state()
    results = [run_model(spec, setup, args.scratch) for spec in args.models]
    if code_state() != code:
        code += f" (changed during the run, to: {code_state()})"

    command = shlex.join([".venv/bin/python", "benchmarks/models.py", *sys.argv[1:]])
    names = ", ".join(r["model"] for r in results)
    md = [
        "# A user's GGUF: blink vs llama.cpp's llama-server",
        "",
        machine(f"GGUFs: {names}"),
        f"Command: `{command}`. {setup.threads} threads each, one server at a time, 127.0.0.1; medians of "
        f"{setup.repeats} requests after one untimed. Code: {code}. {versions(results)}"
        + ("; llama-server with --no-repack (the CPU has AMX)." if setup.no_repack else " (the CPU has no AMX)."),
        "",
        *table(results, setup),
        "",
        "How each figure is measured (the module's docstring):",
        "",
        "```",
        *(__doc__ or "").split("\n\n")[2].splitlines(),
        "```",
        "",
        *CAVEATS,
        "",
        *notes(results),
    ]
    data = {"command": command, "code": code, "setup": asdict(setup) | {"logs": str(setup.logs)}, "models": results}
    write_report(args.out, "models", "\n".join(md) + "\n", data)


if __name__ == "__main__":
    main()
