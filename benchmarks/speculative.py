"""Speculative decoding, side by side with plain decoding in one run on this machine (engine in-process, greedy).

lookup:      prompt lookup (--speculative ngram) at batch 1 on input-grounded tasks: summarise / answer / quote from
             an article pasted from ../shared/data/rag (S08), and rewrite a pasted code snippet (functions from
             blink's own source). Decode tokens/s (first token to last) with and without, and whether the text is
             identical. Each prompt runs plain then speculative, alternating which goes first.
concurrency: 16 requests at once (8 input-grounded, 8 chat questions), aggregate tokens/s with and without
             speculation, after one unmeasured round each, then 4 rounds each, interleaved.
policy:      from the costs the engine measured on this machine, how many guesses the policy gives each sequence at
             each batch size for a given acceptance rate (where speculation turns itself off).
draft:       (--draft, needs `make install-qwen`) Qwen2.5-Coder-0.5B drafting for 1.5B on code prompts: speedup,
             acceptance a, guesses k and cost ratio c next to the expected (1 - a^(k+1)) / ((1 - a)(k c + 1)).

  python benchmarks/speculative.py [--articles 4] [--tokens 128] [--draft] [--out benchmarks/results]
  python benchmarks/speculative.py --only draft     # rerun one part (lookup, concurrency, draft) into the results
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import PROMPTS, machine, write_report
from blink.config import EngineConfig, ModelConfig
from blink.engine import kv_cache, sampler, scheduler
from blink.engine.llm_engine import LLMEngine
from blink.engine.sequence import SamplingParams, Sequence
from blink.engine.speculation import AdaptiveSpeculation, StepCost
from blink.engine.speculative import DraftModelProposer, NgramProposer, Proposer, ngram_lookup
from blink.models.llama import LlamaModel
from blink.models.tokenizer import Tokenizer
from blink.worker import loading

RAG = Path(__file__).resolve().parents[2] / "shared" / "data" / "rag" / "S08"
SNIPPETS = [sampler.probabilities, kv_cache.BlockManager.lookup, kv_cache.BlockManager.free, scheduler.chunk_for]
CODE_TASKS = [
    "Add a docstring to this function and return the whole function.",
    "Rewrite this function with type hints.",
]
LARGE = "qwen2.5-coder-1.5b-instruct"  # the draft pair's target: prompt lookup with a larger model
QWEN_TASKS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Write a Python class for a stack with push, pop and peek.",
    "Write a Python function that merges two sorted lists into one sorted list.",
]


def load(name: str) -> tuple[LlamaModel, Tokenizer]:
    """`name` in the weights `blink serve` gives it (--weights auto: q4 for a 4-bit GGUF, else w8a8)."""
    engine, model = EngineConfig(), ModelConfig(model=name)
    return loading.load_model(name, loading.weights_for(name, engine, model.cache_dir), model, engine, progress=False)


def grounded_prompts(articles: int) -> list[tuple[str, str]]:
    """(kind, user message) for input-grounded tasks: rag articles (summarise, answer, quote) and code rewrites."""
    rows = list(csv.DictReader((RAG / "question_answer_pairs.txt").open(encoding="latin-1"), delimiter="\t"))
    seen: dict[str, str] = {}
    for row in rows:
        path, question = row.get("ArticleFile"), row.get("Question") or ""
        if path and path not in seen and question.endswith("?") and len(question) > 25:
            seen[path] = question
    out: list[tuple[str, str]] = []
    for path, question in sorted(seen.items())[:articles]:
        text = (RAG / f"{path}.txt").read_text(encoding="latin-1", errors="replace")
        excerpt = " ".join(text.split()[:300])
        out.append(("summarise", f"{excerpt}\n\nSummarise the text above in three sentences."))
        out.append(("answer", f"{excerpt}\n\nAnswer from the text above: {question}"))
        out.append(("quote", f"{excerpt}\n\nQuote the sentence of the text above that answers: {question}"))
    for fn in SNIPPETS:
        code = textwrap.dedent(inspect.getsource(fn))
        for task in CODE_TASKS:
            out.append(("code", f"{task}\n\n```python\n{code}```"))
    return out


def timed_generate(engine: LLMEngine, prompt: list[int], params: SamplingParams, rid: str) -> tuple[list[int], float]:
    """Greedy tokens and decode tokens/s (first token to last)."""
    engine.add_request(rid, prompt, params)
    tokens: list[int] = []
    first = last = 0.0
    while engine.has_work():
        for o in engine.step():
            if o.token_id is not None:
                now = time.perf_counter()
                first = first or now
                last = now
                tokens.append(o.token_id)
    rate = (len(tokens) - 1) / (last - first) if len(tokens) > 1 and last > first else 0.0
    return tokens, rate


def copy_ceiling(prompt: list[int], answer: list[int], k: int) -> float:
    """The most prompt lookup can speed decoding up on `answer` (the plain greedy one): its decode tokens (after
    the first) replayed through the n-gram proposer with k guesses every step and verification free: each step
    keeps the guesses that match the answer, plus one token. Decode tokens / steps."""
    pos, steps = 1, 0
    while pos < len(answer):
        guess = ngram_lookup(prompt + answer[:pos], k)
        n = 0
        while n < len(guess) and pos + n < len(answer) and guess[n] == answer[pos + n]:
            n += 1
        pos, steps = pos + n + 1, steps + 1
    return (len(answer) - 1) / steps if steps else 1.0


def engines(model: LlamaModel, tok: Tokenizer, proposer: Proposer, **config: Any) -> tuple[LLMEngine, LLMEngine]:
    cfg = EngineConfig(**{"max_num_seqs": 16, "max_model_len": 2048, **config})
    plain = LLMEngine(model, tok.stop_token_ids, cfg)
    spec = LLMEngine(model, tok.stop_token_ids, cfg, proposer=proposer)
    for engine in (plain, spec):  # warm both the same way
        p = tok.encode_chat([{"role": "user", "content": "Hi!"}])
        engine.generate(p, SamplingParams(max_tokens=8, temperature=0), "warm")
    spec.measure_step_cost()
    spec.speculation.reset()
    return plain, spec


def lookup(model: LlamaModel, tok: Tokenizer, articles: int, max_tokens: int) -> dict[str, Any]:
    plain, spec = engines(model, tok, NgramProposer())
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    rows = []
    for i, (kind, text) in enumerate(grounded_prompts(articles)):
        prompt = tok.encode_chat([{"role": "user", "content": text}])
        before = (spec.speculation.proposed, spec.speculation.accepted)
        order = [(plain, "p"), (spec, "s")] if i % 2 == 0 else [(spec, "s"), (plain, "p")]
        got = {tag: timed_generate(engine, prompt, params, f"{tag}{i}") for engine, tag in order}
        (a, plain_rate), (b, spec_rate) = got["p"], got["s"]
        rows.append(
            {
                "kind": kind,
                "prompt_tokens": len(prompt),
                "tokens": len(a),
                "identical": a == b,
                "plain_tok_s": plain_rate,
                "spec_tok_s": spec_rate,
                "ratio": spec_rate / plain_rate if plain_rate else 0.0,
                "ceiling": copy_ceiling(prompt, a, spec.config.speculative_tokens),
                "proposed": spec.speculation.proposed - before[0],
                "accepted": spec.speculation.accepted - before[1],
            }
        )
        print(
            f"  {kind:9s} {len(prompt):4d}+{len(a):3d} tokens: {plain_rate:5.1f} -> {spec_rate:5.1f} tok/s", flush=True
        )
    return {"rows": rows, "step_costs": spec.step_cost.snapshot(), "policy": policy_table(spec)}


def policy_table(spec: LLMEngine) -> dict[str, dict[int, float]]:
    """Mean guesses per sequence the policy gives at each batch size, for a few acceptance rates."""
    table: dict[str, dict[int, float]] = {}
    for a in (0.3, 0.5, 0.7, 0.9):
        policy = AdaptiveSpeculation(spec.speculation.max_tokens, spec.step_cost, prior_weight=1e9)
        policy._successes, policy._trials = a, 1.0
        table[f"{a:.1f}"] = {}
        for b in (1, 2, 4, 8, 16):
            seqs = [Sequence(str(i), [1], SamplingParams()) for i in range(b)]
            ks = policy.plan(seqs, [policy.max_tokens] * b, lambda ks: 0.0)
            table[f"{a:.1f}"][b] = sum(ks) / b
    return table


def concurrency(model: LlamaModel, tok: Tokenizer, articles: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    plain, spec = engines(model, tok, NgramProposer())
    grounded = [text for _, text in grounded_prompts(articles)][:8]
    texts = grounded + PROMPTS[:8]
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    results: dict[str, list[float]] = {"plain": [], "spec": []}
    outputs: dict[str, dict[str, list[int]]] = {}
    for engine in (plain, spec):  # an unmeasured round each: the first touches of each engine's KV pages
        for i, p in enumerate(prompts):
            engine.add_request(f"warm-{i}", p, params)
        while engine.has_work():
            engine.step()
    for r in range(rounds):
        for name, engine in [("plain", plain), ("spec", spec)] if r % 2 == 0 else [("spec", spec), ("plain", plain)]:
            for i, p in enumerate(prompts):
                engine.add_request(f"{name}{r}-{i}", p, params)
            got: dict[str, list[int]] = {}
            started = time.perf_counter()
            while engine.has_work():
                for o in engine.step():
                    if o.token_id is not None:
                        got.setdefault(o.request_id.split("-")[1], []).append(o.token_id)
            elapsed = time.perf_counter() - started
            results[name].append(sum(len(t) for t in got.values()) / elapsed)
            outputs[name] = got
            print(f"  round {r} {name}: {results[name][-1]:.1f} tok/s", flush=True)
    return {
        "plain_tok_s": results["plain"],
        "spec_tok_s": results["spec"],
        "identical": outputs["plain"] == outputs["spec"],
        "proposed": spec.speculation.proposed,
        "accepted": spec.speculation.accepted,
    }


def forced(engine: LLMEngine, proposer: DraftModelProposer, k: int) -> None:
    """Make the engine's policy guess k tokens whenever it can (told guesses and draft steps cost nothing, and
    not checking what guessing delivers): to measure the acceptance rate the adaptive policy decides from."""
    free = StepCost(smoothing=0.0)
    for span in range(1, 5):
        for rows in range(1, k + 2):
            free.observe(1, rows, 1.0, span)
    engine.speculation.step_cost = free
    engine.speculation.max_tokens = k
    engine.speculation.probe_every = 1
    proposer.step_cost = StepCost(smoothing=0.0)
    proposer.step_cost.observe(1, 1, 0.0)


def draft(max_tokens: int, k: int = 4) -> dict[str, Any]:
    target, tok = load("qwen2.5-coder-1.5b-instruct")
    small, _ = load("qwen2.5-coder-0.5b-instruct")
    config = EngineConfig(max_num_seqs=4, max_model_len=1024)
    adaptive = DraftModelProposer(small, config, vocab_size=target.config.vocab_size)
    plain, spec = engines(target, tok, adaptive, max_num_seqs=4, max_model_len=1024)
    fixed = DraftModelProposer(small, config, vocab_size=target.config.vocab_size)
    always = LLMEngine(target, tok.stop_token_ids, spec.config, proposer=fixed)
    forced(always, fixed, k)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    rows = []
    for i, text in enumerate(QWEN_TASKS):
        prompt = tok.encode_chat([{"role": "user", "content": text}])
        row: dict[str, Any] = {}
        for name, engine in (("plain", plain), ("adaptive", spec), ("forced", always)):
            before = (engine.speculation.proposed, engine.speculation.accepted)
            counts = (engine.speculation.verifications, engine.speculation.misses)
            tokens, rate = timed_generate(engine, prompt, params, f"{name}{i}")
            row[name] = {
                "tokens": len(tokens),
                "tok_s": rate,
                "identical": tokens == row.get("plain", {}).get("ids", tokens),
                "ids": tokens,
                "proposed": engine.speculation.proposed - before[0],
                "accepted": engine.speculation.accepted - before[1],
                "verifications": engine.speculation.verifications - counts[0],
                "misses": engine.speculation.misses - counts[1],
            }
        rows.append(row)
        print(f"  qwen {i}: " + ", ".join(f"{n} {r['tok_s']:.2f} tok/s" for n, r in row.items()), flush=True)
    for row in rows:
        for r in row.values():
            del r["ids"]
    return {
        "rows": rows,
        "k": k,
        "target_step_s": spec.step_cost(1, 1),
        "draft_step_s": adaptive.step_cost(1, 1),
        "verify_ratio": spec.step_cost(1, k + 1) / spec.step_cost(1, 1),  # k + 1 rows vs 1 row
    }


def measured(part: dict[str, Any]) -> list[str]:
    """When and where a part was measured (parts before this line was kept say nothing)."""
    return [f"Measured {part['measured']}\n"] if "measured" in part else []


def lookup_table(part: dict[str, Any]) -> list[str]:
    rows = part["rows"]
    lines = [
        "| task | prompts | median plain | median ngram | median ratio | copy ceiling | ratio / ceiling | "
        "identical text | accepted / proposed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in [*sorted({r["kind"] for r in rows}), "all"]:
        sel = [r for r in rows if kind in ("all", r["kind"])]
        ceiling = [r for r in sel if "ceiling" in r]  # results kept from before the ceiling was measured lack it
        lines.append(
            f"| {kind} | {len(sel)} | {statistics.median(r['plain_tok_s'] for r in sel):.1f} | "
            f"{statistics.median(r['spec_tok_s'] for r in sel):.1f} | "
            f"**{statistics.median(r['ratio'] for r in sel):.2f}x** | "
            + (
                f"{statistics.median(r['ceiling'] for r in ceiling):.2f}x | "
                f"**{statistics.median(r['ratio'] / r['ceiling'] for r in ceiling):.2f}** | "
                if ceiling
                else "- | - | "
            )
            + f"{sum(r['identical'] for r in sel)}/{len(sel)} | "
            f"{sum(r['accepted'] for r in sel)} / {sum(r['proposed'] for r in sel)} |"
        )
    total_plain = sum(r["tokens"] / r["plain_tok_s"] for r in rows if r["plain_tok_s"])
    total_spec = sum(r["tokens"] / r["spec_tok_s"] for r in rows if r["spec_tok_s"])
    lines.append(f"\nAll prompts together: {total_plain / total_spec:.2f}x (total decode time plain / ngram).\n")
    lines.append(
        "Copy ceiling: each plain greedy answer replayed through the n-gram proposer with --speculative-tokens "
        "guesses every step and verification free (decode tokens / steps): the most prompt lookup can give on that "
        "answer. Ratio / ceiling: per prompt, median per task.\n"
    )
    return lines


def report(data: dict[str, Any]) -> str:
    lines = [
        "# Speculative decoding\n",
        "Command: `.venv/bin/python benchmarks/speculative.py [--draft]`; `--only PART` reruns one part, keeping the "
        "others (each part says when and where it was measured).\n",
        "## Prompt lookup at batch 1, input-grounded tasks (greedy, decode tokens/s)\n",
        *measured(data["lookup"]),
        *lookup_table(data["lookup"]),
    ]
    if "lookup_large" in data:
        lines += [
            f"### The same with the {LARGE} target (opt-in: `make install-qwen`; `--only lookup-large`)\n",
            *measured(data["lookup_large"]),
            *lookup_table(data["lookup_large"]),
        ]
    conc = data["concurrency"]
    ratio = statistics.median(conc["spec_tok_s"]) / statistics.median(conc["plain_tok_s"])
    pairs = [s / p for s, p in zip(conc["spec_tok_s"], conc["plain_tok_s"], strict=True)]
    lines += [
        "## 16 requests at once (8 input-grounded, 8 chat)\n",
        *measured(conc),
        f"Aggregate tokens/s, median of {len(conc['plain_tok_s'])} rounds: plain "
        f"{statistics.median(conc['plain_tok_s']):.1f}, ngram {statistics.median(conc['spec_tok_s']):.1f}: "
        f"**{ratio:.2f}x** (round by round: {', '.join(f'{x:.2f}' for x in pairs)}); identical outputs: "
        f"{conc['identical']}; accepted / proposed "
        f"{conc['accepted']} / {conc['proposed']}.\n",
        "## Where speculation turns itself off (the policy on this machine's measured step costs)\n",
        "Mean guesses per sequence for an acceptance rate a (rows) and a batch size (columns):\n",
        "| a | " + " | ".join(f"batch {b}" for b in (1, 2, 4, 8, 16)) + " |",
        "|---|" + "---|" * 5,
    ]
    for a, by_batch in data["lookup"]["policy"].items():
        lines.append(f"| {a} | " + " | ".join(f"{v:.1f}" for v in by_batch.values()) + " |")
    costs = ", ".join(f"{k}: {v * 1000:.0f}" for k, v in data["lookup"]["step_costs"].items())
    lines.append(f"\nMeasured decode step costs (sequences x rows: ms): {costs}.\n")
    if "draft" in data:
        d = data["draft"]

        def total(mode: str, field: str) -> int:
            return sum(int(row[mode][field]) for row in d["rows"])

        def speedup(mode: str) -> float:
            plain = sum(row["plain"]["tokens"] / row["plain"]["tok_s"] for row in d["rows"])
            return plain / sum(row[mode]["tokens"] / row[mode]["tok_s"] for row in d["rows"])

        # per-guess acceptance: a verification stops at its first miss, so a = kept / (kept + misses)
        kept, misses = total("forced", "accepted"), total("forced", "misses")
        a = kept / (kept + misses) if kept + misses else 0.0
        k = total("forced", "proposed") / max(1, total("forced", "verifications"))
        c = d["draft_step_s"] / d["target_step_s"]  # both as measured by the end of the run
        theory = AdaptiveSpeculation.expected_speedup(a, d["k"], c)
        lines += [
            "## Draft model: Qwen2.5-Coder-0.5B for 1.5B, code prompts (greedy)\n",
            *measured(d),
            f"Cost ratio c = {c:.2f} (a draft step {d['draft_step_s'] * 1000:.0f} ms, a target step "
            f"{d['target_step_s'] * 1000:.0f} ms, batch 1, w8a8 both).\n",
            "| mode | speedup vs plain | identical | accepted / proposed | verifications |",
            "|---|---|---|---|---|",
        ]
        for mode in ("adaptive", "forced"):
            same = sum(bool(row[mode]["identical"]) for row in d["rows"])
            lines.append(
                f"| {mode} | {speedup(mode):.2f}x | {same}/{len(d['rows'])} | {total(mode, 'accepted')} / "
                f"{total(mode, 'proposed')} | {total(mode, 'verifications')} |"
            )
        lines.append(
            f"\nForced (k = {d['k']} guesses whenever possible; mean {k:.1f}): per-guess acceptance a = {a:.2f}; "
            f"(1 - a^(k+1)) / ((1 - a)(k c + 1)) = **{theory:.2f}x** expected, {speedup('forced'):.2f}x measured. "
            f"The formula takes the target's check of k guesses to cost one plain step; here {d['k'] + 1} rows "
            f"cost {d['verify_ratio']:.2f}x one row by the engine's step-cost table, which makes the expectation "
            f"{theory * (d['k'] * c + 1) / (d['k'] * c + d['verify_ratio']):.2f}x (a measured speed-up above that "
            "means the table, interpolated from a few sizes timed at warm-up, overestimates verification).\n"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--articles", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--draft", action="store_true", help="also the Qwen pair (make install-qwen)")
    parser.add_argument(
        "--only",
        choices=("lookup", "lookup-large", "concurrency", "draft"),
        help=f"rerun one part into the existing results (lookup-large: prompt lookup with the {LARGE} target)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tok = load("smollm2-135m-instruct")
    parts = {
        "lookup": lambda: lookup(model, tok, args.articles, args.tokens),
        "lookup-large": lambda: lookup(*load(LARGE), args.articles, args.tokens),
        "concurrency": lambda: concurrency(model, tok, args.articles, 96, args.rounds),
        "draft": lambda: draft(64),
    }
    if args.only:
        data = json.loads((args.out / "speculative.json").read_text())
        before = data.pop("machine", None)  # results from before parts kept their own: the run's
        for part in data.values():
            if isinstance(part, dict) and before:
                part.setdefault("measured", before)
        chosen = [args.only]
    else:
        data, chosen = {}, ["lookup", "concurrency", *(["draft"] if args.draft else [])]
    for part in chosen:  # each part keeps when and where it was measured: --only reruns one, keeping the rest
        model_name = {
            "lookup-large": "Qwen2.5-Coder-1.5B-Instruct",
            "draft": "Qwen2.5-Coder-1.5B-Instruct with the 0.5B draft",
        }.get(part, "SmolLM2-135M-Instruct")
        data[part.replace("-", "_")] = {**parts[part](), "measured": machine(model_name)}
    write_report(args.out, "speculative", report(data), data)


if __name__ == "__main__":
    main()
