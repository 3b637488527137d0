"""Rotary scaling against transformers' own functions (modeling_rope_utils.ROPE_INIT_FUNCTIONS), on configs as
checkpoints declare them (config.json through families.family_for_hf): the inverse frequencies and the factor on
cos and sin."""

from __future__ import annotations

import pytest
import torch

from blink.models import families, rope

transformers = pytest.importorskip("transformers")  # a test-only dependency, always installed by `make test`
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

BASE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4}
SCALINGS = {
    "linear": ("LlamaConfig", {"rope_type": "linear", "factor": 4.0}),
    "llama3": (
        "LlamaConfig",
        {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "yarn": ("Qwen2Config", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    "longrope": (
        "Phi3Config",
        {
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.05 * i for i in range(32)],
            "long_factor": [2.0 + 0.5 * i for i in range(32)],
        },
    ),
}


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_scaled_frequencies_are_transformers(kind: str) -> None:
    config_class, scaling = SCALINGS[kind]
    extra = {"original_max_position_embeddings": 4096} if kind == "longrope" else {}
    ref = getattr(transformers, config_class)(
        **BASE, vocab_size=100, rope_theta=50000.0, max_position_embeddings=131072, rope_scaling=dict(scaling), **extra
    )
    want_freq, want_factor = ROPE_INIT_FUNCTIONS[kind](ref, torch.device("cpu"), seq_len=8192)
    raw = ref.to_dict()
    raw["architectures"] = [config_class.replace("Config", "ForCausalLM")]
    _, config = families.family_for_hf(raw)
    assert config.rope["rope_type"] == kind
    got_freq, got_factor = rope.inverse_frequencies(config.head_dim, config.rope, context=8192)
    torch.testing.assert_close(got_freq, want_freq.float(), rtol=1e-6, atol=0)
    assert got_factor == pytest.approx(want_factor)


def test_an_unknown_scaling_is_refused() -> None:
    raw = {**BASE, "vocab_size": 100, "architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "magic"}}
    with pytest.raises(families.UnsupportedModel, match="rope scaling 'magic'"):
        families.family_for_hf(raw)


def test_older_config_json_reads_as_transformers_5s() -> None:
    """Checkpoints saved before transformers 5 write rope_theta and rope_scaling (Llama 3.x: "type" or
    "rope_type"); transformers 5 writes rope_parameters. Both give the same rope."""
    scaling = dict(SCALINGS["llama3"][1])
    sizes = {**BASE, "vocab_size": 100, "max_position_embeddings": 131072}
    old = {**sizes, "architectures": ["LlamaForCausalLM"], "rope_theta": 500000.0}
    new = transformers.LlamaConfig(**sizes, rope_theta=500000.0, rope_scaling=dict(scaling)).to_dict()
    new["architectures"] = ["LlamaForCausalLM"]
    scaling["type"] = scaling.pop("rope_type")
    _, from_old = families.family_for_hf({**old, "rope_scaling": scaling})
    _, from_new = families.family_for_hf(new)
    assert "rope_parameters" in new and "rope_scaling" not in new
    (old_freq, old_factor), (new_freq, new_factor) = (
        rope.inverse_frequencies(64, c.rope) for c in (from_old, from_new)
    )
    assert torch.equal(old_freq, new_freq) and old_factor == new_factor
