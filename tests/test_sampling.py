"""Next-token sampling (megasail.inference.generate.sample_next): temperature and nucleus are applied."""

from __future__ import annotations

import torch

from megasail.inference.generate import SamplingParams, sample_next


def _draws(logits, temperature: float, n: int = 400, seed: int = 0) -> list[int]:
    params = SamplingParams(greedy=False, temperature=temperature, top_p=1.0)
    generator = torch.Generator().manual_seed(seed)
    return [int(sample_next(logits, params, generator)[0]) for _ in range(n)]


def test_temperature_shapes_the_samples():
    """At a fixed seed: temperature 0.01 always gives the argmax (the greedy answer) although the runner-up is
    close; 1.0 and 3.0 give different samples, 3.0 spreading them over more tokens (a flatter distribution).

    Fails if the temperature is ignored (0.01 then samples the runner-up about a third of the time, and 1.0
    and 3.0 draw identical sequences)."""
    logits = torch.tensor([[2.0, 1.5, 0.5, 0.0, -1.0]])
    greedy = int(logits.argmax())
    assert set(_draws(logits, 0.01)) == {greedy}
    warm, hot = _draws(logits, 1.0), _draws(logits, 3.0)
    assert warm != hot
    share = lambda draws: sum(d == greedy for d in draws) / len(draws)  # noqa: E731
    # softmax probability of the argmax: 0.496 at T=1, 0.300 at T=3 (e^(2/T) over the sum of e^(l/T) above)
    assert abs(share(warm) - 0.496) < 0.07 and abs(share(hot) - 0.300) < 0.07
