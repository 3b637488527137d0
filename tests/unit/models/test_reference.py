"""Our Llama model and tokenizer against `transformers` loading the same GGUF file (the reference)."""

from __future__ import annotations

import warnings

import pytest
import torch

from blink.config import EngineConfig
from blink.engine.llm_engine import LLMEngine
from blink.engine.sequence import SamplingParams
from blink.models import registry

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
    "Translate 'good morning' into Spanish and German.",
]


@pytest.fixture(scope="module")
def reference():  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")  # a test-only dependency, always installed by `make test`
    path = registry.get("smollm2-135m-instruct").locate()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tok


@pytest.mark.slow
def test_tokenizer_matches_reference(reference, model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    _, ref_tok = reference
    _, tok = model_and_tokenizer
    texts = [*PROMPTS, "Numbers 1234567 and   spaces\n\n\tnew lines", "café 🚀 日本語 <|im_start|>user\nhi<|im_end|>"]
    for text in texts:  # client text: a control token's name is text (transformers' split_special_tokens)
        assert tok.encode(text) == ref_tok.encode(text, add_special_tokens=False, split_special_tokens=True), text
    chats = [
        [{"role": "user", "content": "hi"}],
        [
            {"role": "system", "content": "Be brief.\n\nDocuments:\n\n[1] The museum opens at 9:00.\n"},
            {"role": "user", "content": "  When does it open?"},
            {"role": "assistant", "content": "At 9:00.\n\n"},
            {"role": "user", "content": "café 🚀 and 1234567"},
        ],
    ]
    for chat in chats:
        assert tok.apply_chat_template(chat) == ref_tok.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )
        rendered = ref_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert tok.encode_chat(chat) == ref_tok.encode(rendered, add_special_tokens=False)  # as before


@pytest.mark.slow
def test_greedy_tokens_match_reference(reference, model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ref_model, _ = reference
    model, tok = model_and_tokenizer
    engine = LLMEngine(model, tok.stop_token_ids, EngineConfig(max_num_seqs=4, max_model_len=512))
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    # all four at once: continuous batching must not change any sequence's tokens
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=24, temperature=0))
    ours: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_work():
        for out in engine.step():
            ours[out.request_id].append(out.token_id)
    for i, ids in enumerate(prompts):
        with torch.inference_mode():
            ref = ref_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=2)
        ref = ref[0, len(ids) :].tolist()
        stops = [j for j, t in enumerate(ref) if t in tok.stop_token_ids]
        ref = ref[: stops[0] + 1] if stops else ref
        assert ours[f"r{i}"] == ref, PROMPTS[i]
