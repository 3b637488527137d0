"""Where blink's memory goes: resident memory (VmRSS) and its peak (VmHWM) of one process after each stage of what
`blink serve` does with its defaults, in the order it does them, and the KV pool as requests fill it.

  stage                     what it adds
  python + torch            the interpreter and libtorch (mostly shared-library pages)
  blink                     blink's modules: gateway (Starlette/uvicorn), bus, worker, engine
  model loaded              the weights as served (--weights auto), converted layer by layer while read; the
                            peak is the conversion's (one layer's fp32 weights, the fp32 embeddings)
  engine                    the paged KV pool (--kv-cache-mb) reserved; resident only where blocks are written
  warm-up                   the replica's warm-up generations and its largest step's activations
  embedder                  the semantic cache's and document store's embedding model (loaded on first use)
  N requests                N distinct ~100-token prompts answered with 16 tokens each: their KV blocks (kept by
                            the prefix cache afterwards)

  python benchmarks/memory.py [--requests 32] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write_report


def status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) // 1024 for k in ("VmRSS", "VmHWM", "RssFile")}  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    stages: list[tuple[str, dict[str, int]]] = [("python + torch", status())]

    import blink.cli.run  # noqa: F401  (the gateway and everything `blink serve` imports)
    from blink.config import CacheConfig, EngineConfig, ModelConfig
    from blink.engine.llm_engine import LLMEngine
    from blink.engine.sequence import SamplingParams
    from blink.semantic_cache.embedder import load_embedder
    from blink.worker import loading

    stages.append(("blink", status()))
    model_config, engine_config = ModelConfig(), EngineConfig()
    weights = loading.weights_for(model_config.model, engine_config, model_config.cache_dir)
    model, tok = loading.load_model(model_config.model, weights, model_config, engine_config, progress=False)
    loading._give_back_freed_memory()
    stages.append((f"model loaded ({weights})", status()))
    serving = loading.Serving(LLMEngine(model, tok.stop_token_ids, engine_config), tok)
    stages.append((f"engine ({engine_config.kv_cache_mb} MiB KV pool reserved)", status()))
    loading.warm_up(serving, engine_config, replica_id="memory")
    stages.append(("warm-up", status()))
    load_embedder(CacheConfig().cache_embedder, model_config.cache_dir)
    stages.append(("embedder", status()))
    engine = serving.engine
    tokens = 0
    for i in range(args.requests):
        text = f"Request {i}: " + " ".join(f"word{(i * 31 + j) % 997}" for j in range(30))
        prompt = tok.encode_chat([{"role": "user", "content": text}])
        tokens += len(prompt) + 16
        engine.add_request(f"m{i}", prompt, SamplingParams(max_tokens=16, ignore_eos=True))
    while engine.has_work():
        engine.step()
    stages.append((f"{args.requests} requests, {tokens} tokens of KV", status()))

    weights_mib = model.weight_bytes() / 2**20
    kv_dtype = engine.runner.kv.k[0].dtype
    kv_per_token = engine.runner.kv.bytes_per_block(model, 1, kv_dtype) / 1024
    lines = [
        "# Where the memory goes: one process doing what `blink serve` does",
        "",
        machine(),
        f"Command: `python benchmarks/memory.py --requests {args.requests}`. Defaults: --weights auto ({weights}), "
        f"--kv-cache-mb {engine_config.kv_cache_mb}, --max-model-len {engine_config.max_model_len}. The model's "
        f"weights and buffers: {weights_mib:.0f} MiB; KV: {kv_per_token:.1f} KiB a token "
        f"({str(kv_dtype).removeprefix('torch.')}, --kv-cache-dtype {engine_config.kv_cache_dtype}).",
        "",
        "| stage | resident MiB | added MiB | peak so far MiB | of which file-backed MiB |",
        "|---|---|---|---|---|",
    ]
    before = 0
    for name, s in stages:
        lines.append(f"| {name} | {s['VmRSS']} | {s['VmRSS'] - before:+d} | {s['VmHWM']} | {s['RssFile']} |")
        before = s["VmRSS"]
    data: dict[str, Any] = {"stages": stages, "weights": weights, "weights_mib": weights_mib}
    write_report(args.out, "memory", "\n".join(lines) + "\n", data)
    print("\n".join(lines))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
