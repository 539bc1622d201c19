"""Update transforms: what each does to a client, per-client independence, no edits of inputs."""

from __future__ import annotations

import math
from typing import Literal

import pytest
import torch

from defenses import ClipL2, DefencePolicy, GaussianNoise, Prune, Quantize, UpdateTransform, client_norms

Update = dict[str, torch.Tensor]


def stacked_update(clients: int, seed: int = 0, scale: float = 1.0) -> Update:
    """A C-client update shaped like a small two-layer model."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "fc1.weight": scale * torch.randn(clients, 16, 12, generator=gen),
        "fc1.bias": scale * torch.randn(clients, 16, generator=gen),
        "fc2.weight": scale * torch.randn(clients, 4, 16, generator=gen),
    }


def generators(seeds: list[int]) -> list[torch.Generator]:
    """One generator per client, seeded as given."""
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def flat(update: Update) -> torch.Tensor:
    """(C, D) view of an update."""
    return torch.cat([value.reshape(value.shape[0], -1) for value in update.values()], dim=1)


def test_clip_bounds_large_clients_and_leaves_small_ones_untouched() -> None:
    update = stacked_update(4)
    update = {
        key: value * torch.tensor([0.01, 1.0, 5.0, 0.0]).view(-1, *[1] * (value.dim() - 1))
        for key, value in update.items()
    }
    norms = client_norms(update)
    bound = 3.0
    assert norms[0] < bound < norms[1] < norms[2]
    clipped = ClipL2(bound).apply(update, generators([0, 1, 2, 3]))
    new_norms = client_norms(clipped)
    torch.testing.assert_close(new_norms[1:3], torch.full((2,), bound))
    for key in update:
        assert torch.equal(clipped[key][0], update[key][0])
        assert torch.equal(clipped[key][3], update[key][3])
        # direction kept: clipped = update * (bound / norm)
        torch.testing.assert_close(clipped[key][2], update[key][2] * bound / norms[2])


@pytest.mark.parametrize("keep", [0.1, 0.25, 0.9, 1.0])
def test_prune_keeps_the_stated_fraction_of_largest_entries(keep: float) -> None:
    update = stacked_update(3)
    pruned = Prune(keep).apply(update, generators([0, 1, 2]))
    before, after = flat(update), flat(pruned)
    total = before.shape[1]
    for c in range(3):
        kept = after[c] != 0
        assert int(kept.sum()) == math.ceil(keep * total)
        assert torch.equal(after[c][kept], before[c][kept])
        if not kept.all():
            assert before[c][kept].abs().min() >= before[c][~kept].abs().max()


def test_gaussian_noise_has_the_stated_standard_deviation() -> None:
    update = stacked_update(2)
    update["big"] = torch.zeros(2, 20000)
    for transform, std in [
        (GaussianNoise(sigma=0.05), 0.05),
        (GaussianNoise(noise_multiplier=1.5, clip_norm=0.2), 0.3),
    ]:
        noisy = transform.apply(update, generators([3, 4]))
        for c in range(2):
            noise = flat(noisy)[c] - flat(update)[c]
            assert abs(float(noise.std()) / std - 1) < 0.03
            assert abs(float(noise.mean())) < 4 * std / math.sqrt(noise.numel())


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("rounding", ["stochastic", "deterministic"])
def test_quantize_uses_at_most_two_to_the_bits_levels_per_client(
    bits: int, rounding: Literal["stochastic", "deterministic"]
) -> None:
    update = stacked_update(3)
    quantized = Quantize(bits, rounding).apply(update, generators([0, 1, 2]))
    before, after = flat(update), flat(quantized)
    for c in range(3):
        assert len(torch.unique(after[c])) <= 2**bits
        assert float(after[c].min()) == pytest.approx(float(before[c].min()), abs=1e-6)
        assert float(after[c].max()) == pytest.approx(float(before[c].max()), abs=1e-6)
        step = float(before[c].max() - before[c].min()) / (2**bits - 1)
        limit = step / 2 if rounding == "deterministic" else step
        assert float((after[c] - before[c]).abs().max()) <= limit * (1 + 1e-5)


def test_stochastic_quantization_is_unbiased() -> None:
    row = torch.linspace(-1.0, 1.0, 50)
    copies = 4000
    update = {"w": row.expand(copies, 50).clone()}
    quantized = Quantize(1, "stochastic").apply(update, generators(list(range(copies))))["w"]
    assert set(torch.unique(quantized).tolist()) == {-1.0, 1.0}
    # each entry is +-1 with mean equal to its value; the mean of 4000 copies is within ~4 standard errors
    torch.testing.assert_close(quantized.mean(dim=0), row, rtol=0, atol=4 / math.sqrt(copies))


TRANSFORMS: list[UpdateTransform] = [
    ClipL2(2.0),
    GaussianNoise(sigma=0.1),
    Prune(0.2),
    Quantize(3, "stochastic"),
    Quantize(3, "deterministic"),
]


@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: str(t.describe()))
def test_a_client_result_does_not_depend_on_its_stack_neighbours(transform: UpdateTransform) -> None:
    update = stacked_update(5, seed=1, scale=0.5)
    seeds = [11, 12, 13, 14, 15]
    together = transform.apply(update, generators(seeds))
    for c in range(5):
        alone = transform.apply({k: v[c : c + 1] for k, v in update.items()}, generators([seeds[c]]))
        for key in update:
            torch.testing.assert_close(together[key][c], alone[key][0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: str(t.describe()))
def test_transforms_return_new_tensors_and_keep_inputs(transform: UpdateTransform) -> None:
    update = stacked_update(3, scale=2.0)
    before = {key: value.clone() for key, value in update.items()}
    result = transform.apply(update, generators([0, 1, 2]))
    assert list(result) == list(update)
    for key in update:
        assert torch.equal(update[key], before[key])
        assert result[key].shape == update[key].shape and result[key].dtype == update[key].dtype
        assert result[key].data_ptr() != update[key].data_ptr()


def test_randomness_comes_from_the_client_generator() -> None:
    update = stacked_update(2)
    first = GaussianNoise(sigma=1.0).apply(update, generators([5, 6]))
    again = GaussianNoise(sigma=1.0).apply(update, generators([5, 6]))
    other = GaussianNoise(sigma=1.0).apply(update, generators([5, 7]))
    for key in update:
        assert torch.equal(first[key], again[key])
        assert torch.equal(first[key][0], other[key][0]) and not torch.equal(first[key][1], other[key][1])


def test_mismatched_generators_are_rejected() -> None:
    with pytest.raises(ValueError, match="leading dimension 2"):
        Prune(0.5).apply(stacked_update(3), generators([0, 1]))


def test_policy_applies_transforms_in_order() -> None:
    update = stacked_update(2, scale=3.0)
    gens = [0, 1]
    policy = DefencePolicy(transforms=(ClipL2(1.0), Prune(0.1)))
    expected = Prune(0.1).apply(ClipL2(1.0).apply(update, generators(gens)), generators(gens))
    result = policy.transform(update, generators(gens))
    for key in update:
        torch.testing.assert_close(result[key], expected[key])
    # pruning after clipping leaves norms below the bound; clipping after pruning reaches it
    assert torch.all(client_norms(result) < 1.0)
    reversed_policy = DefencePolicy(transforms=(Prune(0.1), ClipL2(1.0)))
    torch.testing.assert_close(client_norms(reversed_policy.transform(update, generators(gens))), torch.ones(2))


def test_empty_policy_returns_the_same_values() -> None:
    update = stacked_update(2)
    result = DefencePolicy().transform(update, generators([0, 1]))
    assert result is not update and all(torch.equal(result[k], update[k]) for k in update)
