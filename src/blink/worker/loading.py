"""Bringing a replica's model up: load (prepare from the packaged weights, quantise, the speculative proposer,
the shared prefixes) and warm up, on the replica's engine thread. The result is a `Serving`: the engine and the
tokenizer, never absent once loaded."""

from __future__ import annotations

import contextlib
import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

from blink.config import EngineConfig, ModelConfig, parse_speculative
from blink.engine.llm_engine import LLMEngine
from blink.engine.sequence import SamplingParams
from blink.engine.speculative import DraftModelProposer, NgramProposer, Proposer
from blink.models import loader, native, quant, source
from blink.models.gguf_reader import GGUFModel
from blink.models.llama import LlamaModel
from blink.models.tokenizer import Tokenizer
from blink.worker import shared_prefixes

log = logging.getLogger("blink.worker")


@dataclass(frozen=True)
class Serving:
    engine: LLMEngine
    tokenizer: Tokenizer


def load(model: ModelConfig, engine: EngineConfig, *, replica_id: str, progress: bool) -> Serving:
    weights = weights_for(model.model, engine, model.cache_dir)
    target, tokenizer = load_model(model.model, weights, model, engine, progress=progress)
    if weights in ("w8a8", "q4"):
        kernel = native.describe() if engine.native_kernels else "torch ops (--no-native-kernels)"
        log.info("replica %s: %s layers run on %s", replica_id, weights, kernel)
    proposer = _proposer(target, tokenizer, model, engine, progress=progress)
    path = engine.shared_prefixes
    shared = shared_prefixes.tokenize(shared_prefixes.read(path), tokenizer) if path else []
    llm = LLMEngine(target, tokenizer.stop_token_ids, engine, proposer=proposer, shared_prefixes=shared)
    _give_back_freed_memory()
    return Serving(llm, tokenizer)


def load_model(
    name: str, weights: str, model: ModelConfig, engine: EngineConfig, *, progress: bool
) -> tuple[LlamaModel, Tokenizer]:
    """The model `name` prepared, loaded and put in `weights` layer by layer as it is read (loader.load); in q4 a
    GGUF's own 4-bit blocks are kept as they are."""
    src = source.resolve(name)
    folder = loader.prepare(src, model.cache_dir, progress=progress)
    calibration = Tokenizer.from_folder(folder).encode(quant.CALIBRATION_TEXT)
    # q4 keeps a GGUF's own 4-bit blocks (Q4_0, Q4_1, Q4_K) as they are
    gguf = GGUFModel(src.locate(model.cache_dir), metadata=False) if weights == "q4" and src.kind == "gguf" else None
    blocks = gguf.q4_blocks if gguf is not None else None
    converter = quant.Converter(weights, calibration, native_kernels=engine.native_kernels, blocks=blocks)
    return loader.load(folder, context=engine.max_model_len, convert=converter)


def weights_for(name: str, engine: EngineConfig, cache_dir: Path) -> str:
    """--weights for the model `name`, `auto` resolved from the types its GGUF stores (quant.choose)."""
    if engine.weights != "auto":
        return engine.weights
    src = source.resolve(name)
    types = GGUFModel(src.locate(cache_dir), metadata=False).weight_types() if src.kind == "gguf" else {}
    return quant.choose("auto", types, native_kernels=engine.native_kernels)


def _give_back_freed_memory() -> None:
    """Return the fp32 weights freed by quantising to the system. glibc keeps freed blocks under its mmap
    threshold in its heap: measured on Qwen2.5-Coder-1.5B, resident memory after loading 4.2 GiB, 2.8 GiB after
    malloc_trim. Elsewhere (no glibc) nothing happens."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _proposer(
    target: LlamaModel, tokenizer: Tokenizer, model: ModelConfig, engine: EngineConfig, *, progress: bool
) -> Proposer | None:
    """The --speculative proposer: none, prompt lookup, or a draft model loaded like the target."""
    kind, draft_name = parse_speculative(engine.speculative)
    if kind == "off":
        return None
    if kind == "ngram":
        return NgramProposer()
    draft, draft_tokenizer = load_model(
        draft_name, weights_for(draft_name, engine, model.cache_dir), model, engine, progress=progress
    )
    if draft_tokenizer.tokens != tokenizer.tokens:
        raise ValueError(
            f"draft model {draft_name!r} has another vocabulary than {model.model!r}: speculative decoding "
            "needs the same tokenizer"
        )
    return DraftModelProposer(draft, engine, vocab_size=target.config.vocab_size)


def warm_up(serving: Serving, config: EngineConfig, *, replica_id: str) -> None:
    """The first calls of each kernel and shape allocate and tune: pay that before taking traffic."""
    engine = serving.engine
    prompt = serving.tokenizer.encode_chat([{"role": "user", "content": "Hi!"}])
    for i in range(config.warmup_steps):
        for j in range(2):  # two at once so the batched decode path is warm too
            engine.add_request(f"warmup-{i}-{j}", prompt, SamplingParams(max_tokens=8, temperature=0))
        while engine.has_work():
            engine.step()
    # one step as large as the budget allows: its activations are the largest a step makes, so resident
    # memory reaches its working size (weights + activations; the KV pool grows within --kv-cache-mb) now
    longest = min(config.max_num_batched_tokens, config.max_model_len - 1)
    filler = (prompt * (longest // len(prompt) + 1))[:longest]
    engine.add_request("warmup-full", filler, SamplingParams(max_tokens=1, temperature=0))
    while engine.has_work():
        engine.step()
    if engine.speculation.max_tokens > 0:  # the speculation policy decides from this machine's step costs
        costs = engine.measure_step_cost()  # only sizes the KV pool holds
        engine.speculation.reset()
        log.info(
            "replica %s: decode step costs (sequences x rows: ms) %s",
            replica_id,
            {k: round(v * 1000, 1) for k, v in costs.items()},
        )
