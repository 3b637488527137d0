"""Predicted Outputs (OpenAI's `prediction`), side by side in one run on this machine (engine in-process, batch 1,
greedy): a code-edit set where the prediction is the original code and the edit changes a few lines.

Each task pastes one function of blink's own source (or of the standard library with --stdlib) and asks for a
small edit: rename one of its names everywhere, or add one line. Four runs of each, alternating which goes first:
  plain      no speculation, no prediction
  lookup     the server's default (--speculative ngram, adaptive policy), no prediction
  predicted  the default, with the original code as the prediction
  unrelated  the default, with another task's code as the prediction
Reported: decode tokens/s (first token to last) and whether each answer is plain decoding's, token for token.

  python benchmarks/predicted_outputs.py [--model smollm2-135m-instruct] [--tasks 12] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import inspect
import re
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, served_model, write_report
from blink.config import EngineConfig
from blink.engine import kv_cache, sampler, scheduler, speculation, speculative
from blink.engine.llm_engine import LLMEngine
from blink.engine.sequence import SamplingParams
from blink.engine.speculative import NgramProposer
from blink.gateway import validation
from blink.models import rope

SOURCES = [
    sampler.probabilities,
    kv_cache.BlockManager.lookup,
    kv_cache.BlockManager.free,
    scheduler.chunk_for,
    speculative.ngram_lookup,
    speculation.StepCost.observe,
    validation.get_stop,
    validation.get_sampling,
    rope._yarn,
    rope._longrope,
]
STDLIB = ["textwrap.dedent", "statistics.median", "shlex.split", "json.dumps", "fnmatch.translate"]


def functions(stdlib: bool) -> list[str]:
    if stdlib:
        import importlib

        found = []
        for name in STDLIB:
            module, attr = name.rsplit(".", 1)
            found.append(getattr(importlib.import_module(module), attr))
    else:
        found = list(SOURCES)
    out, seen = [], set()
    for fn in found:
        code = textwrap.dedent(inspect.getsource(fn))
        if code not in seen and 8 <= code.count("\n") <= 45:
            seen.add(code)
            out.append(code)
    return out


def edits(code: str) -> list[str]:
    """Small edits of `code`: rename its first long-enough local name everywhere, add a line at its top."""
    names = [n for n in re.findall(r"\b([a-z_][a-z0-9_]{3,})\s*=", code) if n not in ("self", "return")]
    out = []
    if names:
        out.append(f"Rename the variable `{names[0]}` to `{names[0]}_value` everywhere in this function.")
    out.append("Add the line `# reviewed` as the first line of this function's body.")
    return out


def timed(
    engine: LLMEngine, prompt: list[int], params: SamplingParams, rid: str, prediction: list[int] | None
) -> tuple[list[int], float, int, int]:
    """Greedy tokens, decode tokens/s (first token to last), and the prediction's tokens kept and rejected."""
    engine.add_request(rid, prompt, params, prediction=prediction)
    tokens: list[int] = []
    first = last = 0.0
    kept = rejected = 0
    while engine.has_work():
        for o in engine.step():
            if o.token_id is not None:
                last = time.perf_counter()
                first = first or last
                tokens.append(o.token_id)
            kept, rejected = o.prediction_accepted, o.prediction_rejected
    rate = (len(tokens) - 1) / (last - first) if len(tokens) > 1 and last > first else 0.0
    return tokens, rate, kept, rejected


def run(model_name: str, tasks: int, stdlib: bool) -> dict[str, Any]:
    model, tok, weights = served_model(model_name)  # the server's default weights (q4 for the default model)
    cfg = EngineConfig(max_num_seqs=16, max_model_len=2048)
    plain = LLMEngine(model, tok.stop_token_ids, cfg)
    spec = LLMEngine(model, tok.stop_token_ids, cfg, proposer=NgramProposer())
    warm = tok.encode_chat([{"role": "user", "content": "Hi!"}])
    for engine in (plain, spec):
        engine.generate(warm, SamplingParams(max_tokens=8, temperature=0), "warm")
    spec.measure_step_cost()
    spec.speculation.reset()
    codes = functions(stdlib)
    work = [(code, edit, codes[(i + 1) % len(codes)]) for i, code in enumerate(codes) for edit in edits(code)][:tasks]
    rows = []
    for i, (code, edit, other) in enumerate(work):
        prompt = tok.encode_chat([{"role": "user", "content": f"{edit}\n\n```python\n{code}```"}])
        params = SamplingParams(max_tokens=len(tok.encode(code, bos=False)) + 48, temperature=0)
        runs = {
            "plain": (plain, None),
            "lookup": (spec, None),
            "predicted": (spec, tok.encode(code, bos=False)),
            "unrelated": (spec, tok.encode(other, bos=False)),
        }
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        got = {name: timed(runs[name][0], prompt, params, f"{name}{i}", runs[name][1]) for name in order}
        base = got["plain"][0]
        rows.append(
            {
                "task": edit.split(" ")[0].lower(),
                "tokens": len(base),
                **{f"{name}_tok_s": round(got[name][1], 1) for name in runs},
                **{f"{name}_same": got[name][0] == base for name in runs},
                "kept": got["predicted"][2],
                "rejected": got["predicted"][3],
                "unrelated_kept": got["unrelated"][2],
            }
        )
        r = rows[-1]
        print(
            f"{i}: {r['task']} {r['tokens']} tokens: plain {r['plain_tok_s']}, lookup {r['lookup_tok_s']}, "
            f"predicted {r['predicted_tok_s']} (kept {r['kept']}, rejected {r['rejected']}), unrelated "
            f"{r['unrelated_tok_s']}",
            flush=True,
        )
    return {"model": model_name, "weights": weights, "rows": rows}


def ratio(rows: list[dict[str, Any]], a: str, b: str) -> float:
    """Aggregate decode rate a / b: total tokens over total decode time."""

    def seconds(name: str) -> float:
        return sum(r["tokens"] / r[f"{name}_tok_s"] for r in rows if r[f"{name}_tok_s"] > 0)

    return seconds(b) / seconds(a)


def report(data: dict[str, Any]) -> str:
    rows = data["rows"]
    identical = sum(all(r[f"{n}_same"] for n in ("lookup", "predicted", "unrelated")) for r in rows)
    lines = [
        "# Predicted Outputs: code edits at batch 1",
        "",
        f"{machine(data['model'])} Weights: {data.get('weights', 'w8a8')} (the server's default). Command: "
        f"`python benchmarks/predicted_outputs.py --model {data['model']}`.",
        "",
        "| task | tokens | plain tok/s | lookup tok/s | predicted tok/s | kept / rejected | unrelated tok/s "
        "| same text |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = all(r[f"{n}_same"] for n in ("lookup", "predicted", "unrelated"))
        lines.append(
            f"| {r['task']} | {r['tokens']} | {r['plain_tok_s']} | {r['lookup_tok_s']} | {r['predicted_tok_s']} | "
            f"{r['kept']} / {r['rejected']} | {r['unrelated_tok_s']} | {'yes' if same else 'NO'} |"
        )
    lines += [
        "",
        f"Decode speed-up (total tokens / total decode time), {len(rows)} edits: predicted / plain "
        f"**{ratio(rows, 'predicted', 'plain'):.2f}x**, predicted / lookup "
        f"**{ratio(rows, 'predicted', 'lookup'):.2f}x**, "
        f"unrelated / lookup **{ratio(rows, 'unrelated', 'lookup'):.2f}x**, lookup / plain "
        f"{ratio(rows, 'lookup', 'plain'):.2f}x. Median per edit, predicted / plain: "
        f"{statistics.median(r['predicted_tok_s'] / r['plain_tok_s'] for r in rows):.2f}x.",
        f"Identical to plain decoding: {identical} of {len(rows)} edits (greedy, every mode).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--stdlib", action="store_true", help="edit standard-library functions instead")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    data = run(args.model, args.tasks, args.stdlib)
    name = "predicted_outputs" + ("-stdlib" if args.stdlib else "") + ("" if "smollm2" in args.model else "-qwen")
    write_report(args.out, name, report(data), data)


if __name__ == "__main__":
    main()
