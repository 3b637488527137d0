"""The gemma3 family and K-quant weights on a real model (make install-gemma: Gemma 3 270M base, Q4_K_M, whose
tensors are Q4_K, Q6_K, Q5_0, Q8_0 and F32), against `transformers` loading the same GGUF: the tokenizer read from
the GGUF (SentencePiece) gives transformers' ids, the logits of a prompt longer than the 512-token sliding window
agree, and blink's engine decodes transformers' greedy tokens. Deselected unless `-m` names gemma."""

from __future__ import annotations

import warnings

import pytest
import torch

from blink.config import EngineConfig, default_cache_dir
from blink.engine.llm_engine import LLMEngine
from blink.engine.sequence import SamplingParams
from blink.models import loader, source
from blink.models.llama import CausalAttention, LlamaModel
from blink.models.tokenizer import Tokenizer

pytestmark = pytest.mark.gemma
transformers = pytest.importorskip("transformers")  # a test-only dependency, always installed by `make test`


@pytest.fixture(scope="module")
def pair() -> tuple[LlamaModel, Tokenizer, torch.nn.Module, object]:
    gemma = source.resolve("gemma-3-270m")
    path = gemma.locate(default_cache_dir())
    model, tokenizer = loader.load(loader.prepare(gemma, default_cache_dir(), progress=False), context=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        ref_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer, ref.eval(), ref_tok


def test_tokenizer_from_the_gguf_is_transformers(pair) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer, _, ref_tok = pair
    for text in ["The capital of France is", "café 🚀 日本語  spaces\n\n\ttabs", "def f(x):\n    return x * 2"]:
        assert tokenizer.encode(text) == ref_tok.encode(text)


def test_logits_past_the_sliding_window(pair) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, ref, _ = pair
    assert model.config.sliding_window == 512 and model.config.window(5) is None
    ids = tokenizer.encode("The history of the Roman Empire begins with the founding of Rome. " * 60)[:700]
    n = len(ids)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
        got = model(torch.tensor(ids), torch.arange(n), CausalAttention(model.config), torch.arange(n))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


def test_engine_greedy_is_transformers_generate(pair) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, ref, _ = pair
    prompts = ["The capital of France is", "Photosynthesis is the process by which", "def fibonacci(n):"]
    engine = LLMEngine(model, tokenizer.stop_token_ids, EngineConfig(weights="fp32", max_model_len=1024))
    for i, text in enumerate(prompts):
        engine.add_request(str(i), tokenizer.encode(text), SamplingParams(max_tokens=20, temperature=0))
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_work():
        for out in engine.step():
            if out.token_id is not None:
                got[out.request_id].append(out.token_id)
    stop = sorted(tokenizer.stop_token_ids)
    for i, text in enumerate(prompts):
        ids = torch.tensor([tokenizer.encode(text)])
        with torch.no_grad():
            want = ref.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
        assert got[str(i)] == want[0, ids.shape[1] :].tolist(), text
