from __future__ import annotations

import pytest
import torch

from blink.engine.sampler import sample
from blink.engine.sequence import SamplingParams


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_greedy_is_argmax() -> None:
    logits = torch.randn(3, 50, generator=gen(0))
    params = [SamplingParams(temperature=0)] * 3
    assert sample(logits, params, [None] * 3) == logits.argmax(-1).tolist()


def test_seeded_sampling_repeats_and_depends_on_the_seed() -> None:
    logits = torch.zeros(1, 1000)
    p = SamplingParams(temperature=1.0)

    def draw(seed: int) -> list[int]:
        g = gen(seed)
        return [sample(logits, [p], [g])[0] for _ in range(20)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_top_k_and_top_p_restrict_the_choice() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0]])
    g = gen(0)
    picks = {sample(logits, [SamplingParams(temperature=2.0, top_k=2)], [g])[0] for _ in range(200)}
    assert picks == {0, 1}
    picks = {sample(logits, [SamplingParams(temperature=1.0, top_p=0.5)], [g])[0] for _ in range(200)}
    assert picks == {0}  # token 0 alone holds more than half the mass


@pytest.mark.parametrize("kwargs", [{"max_tokens": 0}, {"temperature": 3.0}, {"top_p": 0.0}, {"top_k": -1}])
def test_invalid_parameters_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("temperature", "top_p"), [(1.1e-308, 1.0), (1e-5, 1.0), (2e-5, 1.0), (1.0, 3.2e-139), (1.9, 1e-300)]
)
def test_extreme_but_valid_settings_sample_a_real_token(temperature: float, top_p: float) -> None:
    """A client's temperature or top_p near 0 once made a NaN distribution and failed the whole engine step."""
    logits = torch.randn(2, 50, generator=gen(3)) * 30
    params = [SamplingParams(temperature=temperature, top_p=top_p)] * 2
    assert sample(logits, params, [gen(1), gen(2)]) == logits.argmax(-1).tolist()
