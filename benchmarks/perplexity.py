"""Perplexity of blink's weight formats beside llama.cpp's `llama-perplexity` on the same GGUF and the same text.

The held text: Wikipedia articles from ../shared/data/rag (S09, sets --sets), which no format was tuned on. Both
sides score it as llama-perplexity does: the tokens cut into chunks of --ctx, each chunk read from its start, and
the second half of each chunk scored (the negative log-likelihood of each token given everything before it in
the chunk). blink tokenizes with its own tokenizer; the token counts of both sides are printed beside the
figures (they agree when the tokenizers do).

  python benchmarks/perplexity.py [--model smollm2-135m-instruct] [--ctx 256] [--chunks 16]
      [--llama-perplexity benchmarks/peers/.venvs/llamaserver/bin/llama-perplexity]
  (build llama-perplexity with benchmarks/peers/setup.sh llamaserver, then
   `cmake --build benchmarks/peers/.venvs/llamaserver --target llama-perplexity`)
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, served_model, write_report
from blink.config import default_cache_dir
from blink.models import source
from blink.models.llama import CausalAttention

RAG = Path(__file__).resolve().parents[2] / "shared" / "data" / "rag" / "S09" / "data"
HERE = Path(__file__).resolve().parent


def held_text(sets: list[str]) -> str:
    texts = []
    for name in sets:
        for path in sorted((RAG / name).glob("*.txt")):
            texts.append(path.read_text(encoding="latin-1", errors="replace"))
    return "\n\n".join(texts)


@torch.inference_mode()
def blink_perplexity(model_name: str, weights: str, text: str, ctx: int, chunks: int) -> tuple[float, int]:
    model, tok, _ = served_model(model_name, weights, context=max(ctx, 512))  # as blink serve loads it
    ids = tok.encode(text)
    nll, count = 0.0, 0
    for c in range(min(chunks, len(ids) // ctx)):
        chunk = ids[c * ctx : (c + 1) * ctx]
        logits = model(torch.tensor(chunk), torch.arange(ctx), CausalAttention(model.config), torch.arange(ctx))
        first = ctx // 2
        nll += float(F.cross_entropy(logits[first:-1].float(), torch.tensor(chunk[first + 1 :]), reduction="sum"))
        count += ctx - 1 - first
    return math.exp(nll / count), len(ids)


def llama_perplexity(binary: Path, gguf: Path, text: str, ctx: int, chunks: int, threads: int) -> tuple[float, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
    cmd = [str(binary), "-m", str(gguf), "-f", f.name, "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks)]
    cmd += ["-t", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800)
    log = out.stdout + out.stderr
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    tokens = re.search(r"calculating perplexity over (\d+) chunks", log)
    if found is None:
        raise RuntimeError(f"llama-perplexity printed no estimate:\n{log[-2000:]}")
    return float(found.group(1)), tokens.group(1) if tokens else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--sets", default="set1,set2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", default="fp32,q4,w8a8", help="blink's weight formats to score")
    parser.add_argument("--llama-perplexity", type=Path, default=HERE / "peers/.venvs/llamaserver/bin/llama-perplexity")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    text = held_text(args.sets.split(","))
    gguf = source.resolve(args.model).locate(default_cache_dir())
    theirs, their_tokens = llama_perplexity(args.llama_perplexity, gguf, text, args.ctx, args.chunks, args.threads)
    rows: dict[str, Any] = {}
    for weights in args.formats.split(","):
        ppl, tokens = blink_perplexity(args.model, weights, text, args.ctx, args.chunks)
        rows[weights] = {"perplexity": ppl, "vs_llama_cpp": ppl / theirs - 1, "tokens": tokens}
        print(weights, rows[weights], flush=True)
    lines = [
        "# Perplexity: blink's weight formats beside llama.cpp on the same GGUF",
        "",
        f"{machine(args.model)} Command: `python benchmarks/perplexity.py --model {args.model} --ctx {args.ctx} "
        f"--chunks {args.chunks} --sets {args.sets}`. Text: Wikipedia articles (rag S09 {args.sets}); {args.chunks} "
        f"chunks of {args.ctx} tokens, the second half of each scored, as llama-perplexity does.",
        "",
        "| engine | weights | perplexity | vs llama.cpp |",
        "|---|---|---|---|",
        f"| llama.cpp llama-perplexity | the GGUF's own ({their_tokens} chunks) | {theirs:.4f} | - |",
    ]
    for weights, r in rows.items():
        lines.append(
            f"| blink | {weights} (its text: {r['tokens']} tokens) | {r['perplexity']:.4f} | "
            f"{r['vs_llama_cpp'] * 100:+.2f}% |"
        )
    data = {"model": args.model, "llama_cpp": theirs, "blink": rows}
    name = "perplexity" + ("" if "smollm2" in args.model else "-" + args.model.split("/")[-1].removesuffix(".gguf"))
    write_report(args.out, name, "\n".join(lines) + "\n", data)


if __name__ == "__main__":
    main()
