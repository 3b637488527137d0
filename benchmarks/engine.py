"""The engine alone, side by side in one run on this machine: decode speed and the accuracy of each weight format.

decode:    ms per token at batch 1 (greedy, 64 tokens after a chat prompt): blink's engine with fp32, bf16, int8
           (weight-only) and w8a8 weights (w8a8-torch: its linear layers on torch's int8 ops instead of blink's C
           kernel, the same numbers; decode attention in C for all), and `transformers` `generate` on the same
           model (same GGUF, fp32),
           taking turns request by request (--rounds each), so that the machine's slow moments hit all alike.
prefill:   ms for a cold 100- and 500-token prompt (one step, no prefix cache) in each format.
agreement: for 20 prompts, fp32 greedy continuations (48 tokens); each format then reads prompt + continuation in
           one forward (teacher forcing) and we count the positions where its argmax equals fp32's.
perplexity of each format on a held text (the README's first paragraphs are not used: a fixed text below).

  python benchmarks/engine.py [--tokens 64] [--rounds 8] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import PROMPTS, machine, transformers_model, write_report
from blink.config import EngineConfig, default_cache_dir
from blink.engine.llm_engine import LLMEngine
from blink.engine.sequence import SamplingParams
from blink.models import loader, quant, source
from blink.models.llama import CausalAttention, LlamaModel
from blink.models.tokenizer import Tokenizer

FORMATS = ("fp32", "bf16", "int8", "w8a8", "q4")
# timed only: w8a8 linear layers on torch's int8 ops instead of blink's C kernel, the same numbers
TIMED = (*FORMATS, "w8a8-torch")
PREFILL_LENGTHS = (100, 500)
HELD_TEXT = (
    "The river rises in the hills to the north and runs for about two hundred miles before it reaches the sea. "
    "For most of its length it is slow and wide, and barges carried grain and timber down to the port until the "
    "railway came. The towns along its banks grew up around bridges and mills; several still hold a market once a "
    "week, and in summer the towpath is busy with walkers and cyclists. Floods were common in the past, and the "
    "stone markers on the church walls show how high the water came in the worst years. Since the new embankments "
    "were built the town has stayed dry, although the meadows below it still flood most winters, which the birds "
    "that spend the cold months there seem to welcome."
)


@torch.inference_mode()
def all_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    n = len(ids)
    return model(torch.tensor(ids), torch.arange(n), CausalAttention(), torch.arange(n))  # [n, V]


def load(fmt: str) -> tuple[LlamaModel, Tokenizer]:
    folder = loader.prepare(source.resolve("smollm2-135m-instruct"), default_cache_dir(), progress=False)
    model, tok = loader.load(folder)
    if fmt != "fp32":
        weights = fmt.removesuffix("-torch")
        quant.convert(model, weights, tok.encode(quant.CALIBRATION_TEXT), native_kernels=not fmt.endswith("-torch"))
    return model, tok


def chat(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": text}])


class BlinkDecoder:
    """blink's engine with one weight format: decode ms/token of one request at batch 1."""

    def __init__(self, fmt: str, tokens: int, threads: int) -> None:
        self.model, self.tok = load(fmt)
        self.engine = LLMEngine(self.model, self.tok.stop_token_ids, EngineConfig(threads=threads, max_model_len=1024))
        self.params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        self.tokens, self.threads, self.calls = tokens, threads, 0

    def __call__(self, prompt: str) -> float:
        torch.set_num_threads(self.threads)
        self.calls += 1
        self.engine.add_request(f"r{self.calls}", chat(self.tok, prompt), self.params)
        self.engine.step()  # prefill and first token: not decode
        start = time.perf_counter()
        while self.engine.has_work():
            self.engine.step()
        return (time.perf_counter() - start) / (self.tokens - 1) * 1000

    def prefill_ms(self) -> dict[int, float]:
        """Cold prefill ms by prompt length (median of three prompts, one step each, no prefix cache)."""
        cfg = EngineConfig(threads=self.threads, max_model_len=1024, prefix_caching=False)
        cold = LLMEngine(self.model, self.tok.stop_token_ids, cfg)
        text = self.tok.encode(HELD_TEXT * 5)
        prefill = {}
        for n in PREFILL_LENGTHS:
            times = []
            for r in range(3):  # three different prompts of n tokens, one step each (n <= the step's token budget)
                start = time.perf_counter()
                cold.generate(text[r : r + n], SamplingParams(max_tokens=1, temperature=0), request_id=f"p{n}-{r}")
                times.append((time.perf_counter() - start) * 1000)
            prefill[n] = statistics.median(times)
        return prefill


class TransformersDecoder:
    """`transformers` `generate` on the same model (fp32): decode ms/token of one request."""

    def __init__(self, tokens: int, threads: int) -> None:
        self.model = transformers_model()
        self.tok = load("fp32")[1]
        self.tokens, self.threads = tokens, threads

    def __call__(self, prompt: str) -> float:
        torch.set_num_threads(self.threads)
        ids = torch.tensor([chat(self.tok, prompt)])
        kwargs: dict[str, Any] = {"do_sample": False, "pad_token_id": 0}
        with torch.inference_mode():
            start = time.perf_counter()
            self.model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
            one = time.perf_counter() - start
            start = time.perf_counter()
            self.model.generate(ids, max_new_tokens=self.tokens, min_new_tokens=self.tokens, **kwargs)
            full = time.perf_counter() - start
        return (full - one) / (self.tokens - 1) * 1000  # minus prefill and first token


def decode_ms(decoders: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    """Each decoder's ms/token, round by round: in each round every decoder answers the same prompt, in an order
    rotated from round to round, so a slow moment of this shared machine falls on all of them alike."""
    names = list(decoders)
    for name in names:  # warm-up, not measured
        decoders[name](PROMPTS[0])
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out[name].append(decoders[name](PROMPTS[1 + r % (len(PROMPTS) - 1)]))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in out.items()), flush=True)
    return out


def accuracy(tokens: int) -> dict[str, dict[str, float]]:
    reference, tok = load("fp32")
    engine = LLMEngine(reference, tok.stop_token_ids, EngineConfig(max_model_len=1024))
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    sequences = []
    for i, prompt in enumerate(PROMPTS):
        ids = chat(tok, prompt)
        sequences.append((len(ids), ids + engine.generate(ids, params, request_id=f"a{i}")))
    held = tok.encode(HELD_TEXT)
    ref_argmax = [all_logits(reference, seq)[start - 1 : -1].argmax(-1) for start, seq in sequences]
    out: dict[str, dict[str, float]] = {}
    for fmt in FORMATS:
        model = reference if fmt == "fp32" else load(fmt)[0]
        agree = total = 0
        for (start, seq), expected in zip(sequences, ref_argmax, strict=True):
            got = all_logits(model, seq)[start - 1 : -1].argmax(-1)
            agree += int((got == expected).sum())
            total += len(expected)
        logits = all_logits(model, held)[:-1]
        nll = F.cross_entropy(logits, torch.tensor(held[1:]))
        out[fmt] = {"agreement": agree / total, "perplexity": math.exp(float(nll)), "tokens": total}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    parser.add_argument("--formats", default=",".join(TIMED), help="weight formats to time, comma-separated")
    parser.add_argument("--rounds", type=int, default=8, help="measured requests per decoder, interleaved")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    from blink.config import resolve_threads

    threads = resolve_threads(args.threads)
    decoders: dict[str, Any] = {
        f"blink {fmt}": BlinkDecoder(fmt, args.tokens, threads) for fmt in args.formats.split(",")
    }
    decoders["transformers fp32"] = TransformersDecoder(args.tokens, threads)
    rounds = decode_ms(decoders, args.rounds)
    decode = {name: statistics.median(values) for name, values in rounds.items()}
    # each round's own ratio against transformers, then their median: robust to the machine's slow moments
    speedup = {
        name: statistics.median(t / b for t, b in zip(rounds["transformers fp32"], values, strict=True))
        for name, values in rounds.items()
    }
    prefill = {name: d.prefill_ms() for name, d in decoders.items() if isinstance(d, BlinkDecoder)}
    del decoders
    acc = accuracy(48)
    lines = [
        "# Engine: decode speed and weight-format accuracy",
        "",
        machine(),
        f"Command: `python benchmarks/engine.py --tokens {args.tokens} --threads {args.threads} --rounds "
        f"{args.rounds}` ({threads} threads). Decoders take turns, one request each per round (order rotated); the "
        "speed-up is the median of the rounds' own ratios.",
        "",
        "| engine | decode ms/token (batch 1, median) | speed-up vs transformers | cold prefill ms, "
        + ", ".join(f"{n} tokens" for n in PREFILL_LENGTHS)
        + " |",
        "|---|---|---|---|",
    ]
    for name, ms in decode.items():
        cold = ", ".join(f"{prefill[name][n]:.0f}" for n in PREFILL_LENGTHS) if name in prefill else "-"
        lines.append(f"| {name} | {ms:.1f} | {speedup[name]:.2f}x | {cold} |")
    lines += [
        "",
        f"Greedy agreement with fp32 (teacher-forced argmax over {acc['fp32']['tokens']:.0f} continuation tokens of "
        f"{len(PROMPTS)} prompts) and perplexity on a held text:",
        "",
        "| weights | agreement with fp32 | perplexity |",
        "|---|---|---|",
    ]
    lines += [f"| {fmt} | {a['agreement'] * 100:.1f}% | {a['perplexity']:.2f} |" for fmt, a in acc.items()]
    raw = {"decode_ms": decode, "decode_rounds_ms": rounds, "speedup": speedup, "prefill_ms": prefill, "accuracy": acc}
    write_report(args.out, "engine", "\n".join(lines) + "\n", raw)


if __name__ == "__main__":
    main()
