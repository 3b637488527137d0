"""Sliding-window layers (Gemma 3's local layers, Mistral v0.1, Phi-3 mini) through the paged engine: past the
window, prompt chunks, prefix-cache hits and decode rows (torch's SDPA and the C kernel) attend to each row's last
`window` positions only, as `transformers` does. A tiny random Gemma 3 with a 24-token window, 40-token prompts."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from blink.config import EngineConfig
from blink.engine.llm_engine import LLMEngine
from blink.models import families, native
from blink.models.llama import CausalAttention, LlamaModel
from tests.tiny_models import TINY, greedy_alone_then_batched, hf_model

WINDOW, PROMPT, NEW = 24, 40, 24


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, LlamaModel]:
    tiny = TINY["gemma3"]
    tiny = type(tiny)(**{**tiny.__dict__, "config": {**tiny.config, "sliding_window": WINDOW}})
    reference = hf_model(tiny, 300)
    folder: Path = tmp_path_factory.mktemp("gemma3-window")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.save_pretrained(folder)
    family, config = families.family_for_hf(json.loads((folder / "config.json").read_text()))
    assert config.window(0) == WINDOW and config.window(5) is None  # five local layers, then a global one
    with torch.device("meta"):
        ours = family.model(config)
    ours.load_checkpoint({k: v.detach().clone() for k, v in reference.state_dict().items()})
    ours.init_rope()
    return reference, ours.eval()


def _greedy_reference(reference: torch.nn.Module, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = reference.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def test_causal_reference_backend_windows_as_transformers(pair: tuple[torch.nn.Module, LlamaModel]) -> None:
    reference, ours = pair
    ids = torch.randint(0, 300, (PROMPT,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(ids.unsqueeze(0)).logits[0]
        windowed = ours(ids, torch.arange(PROMPT), CausalAttention(ours.config), torch.arange(PROMPT))
        full = ours(ids, torch.arange(PROMPT), CausalAttention(), torch.arange(PROMPT))
    torch.testing.assert_close(windowed, want, rtol=1e-4, atol=1e-4)
    assert (full[WINDOW:] - want[WINDOW:]).abs().max() > 1e-3  # the window matters past it: the test can fail


@pytest.mark.parametrize("native_kernels", [False, pytest.param(True, id="c-kernel")])
def test_engine_greedy_matches_transformers_past_the_window(
    pair: tuple[torch.nn.Module, LlamaModel], native_kernels: bool
) -> None:
    if native_kernels and not native.available():
        pytest.fail("the C kernel is not built (make install builds it)")
    reference, ours = pair
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 300, (PROMPT + i,), generator=gen).tolist() for i in range(3)]
    prompts.append(prompts[0][:30] + prompts[1][30:])  # shares a prefix-cache block with the first
    want = [_greedy_reference(reference, p) for p in prompts]
    config = EngineConfig(weights="fp32", native_kernels=native_kernels, max_model_len=256, kv_cache_mb=16)
    engine = LLMEngine(ours, frozenset(), config)
    assert greedy_alone_then_batched(engine, prompts, NEW) == want
