"""Fair sharing between tenants: one tenant's first token while another floods the engine.

Tenant B sends one chat request (max_tokens 1: its first token is its answer). We time it from `add_request` to
the step that returns its token, in steps and wall ms:
  idle:   on an engine with nothing else to do,
  flood:  on an engine where tenant A runs --streams ignore_eos streams (max_tokens 256, refilled as they end),
          so the batch (--max-num-seqs) is full and more of A's requests wait,
taking turns round by round (two engines on the same weights), so that the machine's slow moments hit both alike.
Also, with --baseline: the same flood with no tenants (every request None, the engine before tenant fairness),
one round, capped at --baseline-steps steps. The cost to A: its decode step before B arrived vs its inter-token
gap across B's arrival. The target is flood/idle <= 1.5x.

This drives the engine directly: until API keys land in the gateway, a client cannot choose its tenant over HTTP.

  python benchmarks/fairness.py [--streams 32] [--rounds 8] [--baseline] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import PROMPTS, machine, write_report
from blink.config import EngineConfig, default_cache_dir
from blink.engine.llm_engine import LLMEngine
from blink.engine.sequence import SamplingParams
from blink.models import loader, quant, source
from blink.models.tokenizer import Tokenizer

STREAM = SamplingParams(max_tokens=256, temperature=0, ignore_eos=True)
FIRST = SamplingParams(max_tokens=1, temperature=0)


def chat(tok: Tokenizer, system: str, text: str) -> list[int]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    return tok.encode_chat(messages)


class Flood:
    """An engine where tenant `a` keeps `streams` streams going (None: no tenants at all)."""

    def __init__(self, engine: LLMEngine, tok: Tokenizer, streams: int, tenant: str | None) -> None:
        self.engine, self.tok, self.tenant, self.streams, self.started = engine, tok, tenant, streams, 0
        self.step_ms: list[float] = []
        self.refill()
        while any(s.num_computed < len(s.prompt_token_ids) for s in engine.scheduler.running) or not self.full():
            self.step()  # until the batch is full and every running stream decodes

    def full(self) -> bool:
        return self.engine.num_running == self.engine.config.max_num_seqs

    def refill(self) -> None:
        live = sum(1 for s in self.engine.scheduler.running + self.engine.scheduler.waiting if s.tenant == self.tenant)
        for _ in range(self.streams - live):
            prompt = chat(self.tok, "You are a storyteller.", f"Story {self.started}: {PROMPTS[self.started % 20]}")
            self.engine.add_request(f"a{self.started}", prompt, STREAM, tenant=self.tenant)
            self.started += 1

    def step(self) -> list[Any]:
        started = time.perf_counter()
        outs = self.engine.step()
        self.step_ms.append((time.perf_counter() - started) * 1000)
        self.refill()
        return outs


def first_token(
    engine: LLMEngine, flood: Flood | None, prompt: list[int], rid: str, tenant: str | None, cap: int
) -> dict[str, float]:
    """Steps and wall ms from adding B's request to its first token (at most `cap` steps); under a flood also A's
    decode step before and A's inter-token gap across B's arrival (to A's next token)."""
    engine.add_request(rid, prompt, FIRST, tenant=tenant)
    out = {"a_step_before_ms": flood.step_ms[-1] if flood else 0.0, "a_gap_ms": 0.0}
    started, steps = time.perf_counter(), 0
    while "ms" not in out or (flood and not out["a_gap_ms"]):
        if steps == cap:
            engine.abort(rid)
            out.update(ms=(time.perf_counter() - started) * 1000, steps=steps)
            break
        outs = flood.step() if flood else engine.step()
        steps += 1
        ms = (time.perf_counter() - started) * 1000
        if "ms" not in out and any(o.request_id == rid and o.token_id is not None for o in outs):
            out.update(ms=ms, steps=steps)
        if flood and not out["a_gap_ms"] and any(o.request_id != rid and o.token_id is not None for o in outs):
            out["a_gap_ms"] = ms
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=32, help="tenant A's ignore_eos streams")
    parser.add_argument("--rounds", type=int, default=8, help="measured requests of B per condition, alternating")
    parser.add_argument("--gap-steps", type=int, default=8, help="flood steps between two of B's requests")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    parser.add_argument("--baseline", action="store_true", help="also one round with no tenants (before fairness)")
    parser.add_argument("--baseline-steps", type=int, default=400, help="most steps the baseline round waits")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    folder = loader.prepare(source.resolve("smollm2-135m-instruct"), default_cache_dir(), progress=False)
    model, tok = loader.load(folder)
    quant.convert(model, "w8a8", tok.encode(quant.CALIBRATION_TEXT), native_kernels=True)
    config = EngineConfig(threads=args.threads)
    idle = LLMEngine(model, tok.stop_token_ids, config)
    busy = LLMEngine(model, tok.stop_token_ids, config)
    idle.generate(chat(tok, "Warm-up.", PROMPTS[0]), FIRST, "warmup")
    flood = Flood(busy, tok, args.streams, "a")
    rounds: dict[str, list[dict[str, float]]] = {"idle": [], "flood": []}
    for i in range(args.rounds):
        # a new system prompt each time: B never finds its earlier prompts in the cache
        prompt = chat(tok, f"Request {i}. You answer in one sentence.", PROMPTS[(i + 7) % 20])
        rounds["idle"].append(first_token(idle, None, prompt, f"b{i}", "b", 1000))
        rounds["flood"].append(first_token(busy, flood, prompt, f"b{i}", "b", 1000))
        for _ in range(args.gap_steps):
            flood.step()
    report = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in rounds.items()}
    report["ratio"] = {k: report["flood"][k] / report["idle"][k] for k in ("ms", "steps")}
    del busy, flood
    if args.baseline:
        plain = LLMEngine(model, tok.stop_token_ids, config)
        before = Flood(plain, tok, args.streams, None)
        prompt = chat(tok, "Request baseline. You answer in one sentence.", PROMPTS[3])
        report["baseline"] = first_token(plain, before, prompt, "b", None, args.baseline_steps)
    write_report(args.out, "fairness", markdown(args, report), {"rounds": rounds, **report})


def markdown(args: argparse.Namespace, r: dict[str, Any]) -> str:
    idle, flood = r["idle"], r["flood"]
    lines = [
        "# Fairness: one tenant's first token while another floods the engine",
        "",
        machine(),
        f"Command: `python benchmarks/fairness.py --streams {args.streams} --rounds {args.rounds} --threads "
        f"{args.threads}{f' --baseline --baseline-steps {args.baseline_steps}' if args.baseline else ''}` (a shared "
        "machine: --threads 1 keeps other processes from stalling torch's thread pool). Engine defaults "
        f"(max_num_seqs {EngineConfig().max_num_seqs}, prefill_chunk_tokens {EngineConfig().prefill_chunk_tokens}), "
        "w8a8. Medians over the rounds.",
        "",
        "| tenant B's first token | steps | wall ms | tenant A's decode step before B / its token gap across B, ms |",
        "|---|---|---|---|",
        f"| idle engine | {idle['steps']:.0f} | {idle['ms']:.0f} | - |",
        f"| A runs {args.streams} ignore_eos streams | {flood['steps']:.0f} | {flood['ms']:.0f} | "
        f"{flood['a_step_before_ms']:.0f} / {flood['a_gap_ms']:.0f} |",
    ]
    if "baseline" in r:
        b = r["baseline"]
        lines.append(
            f"| same flood, no tenants (before fairness; capped at {args.baseline_steps} steps) | {b['steps']:.0f} | "
            f"{b['ms']:.0f} | - |"
        )
    lines += [
        "",
        f"Ratio flood / idle: {r['ratio']['ms']:.2f}x wall, {r['ratio']['steps']:.2f}x steps (target <= 1.5x). Under "
        "the flood B's whole prompt is prefilled in a step of its own (it takes the slot of A's latest stream; A's "
        "streams sit that step out), so A pays once: one of its token gaps grows by B's prefill.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
