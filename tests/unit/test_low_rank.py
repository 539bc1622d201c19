"""Audited updates sent as a thin SVD: the same matrix, a function of the update alone, the same attack answer."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
import torch

from attacks import DenseRatio
from attacks.dense_ratio import rank_by_similarity
from attacks.layers import gradient_factors, gradient_rows, summed_gradient
from defenses import CrossEntropy
from testbed.audit.attack_worker import attack_model
from testbed.audit.outcome import attacker_view
from testbed.config.topology import validate
from testbed.runtime import low_rank, simulation
from testbed.runtime.low_rank import thin_factors, worth_factoring
from testbed.runtime.preparation import initial_params, prepare_data
from testbed.runtime.records import ChunkTask, ClientUpdate
from testbed.runtime.simulation import SimulationContext, simulate_chunk
from tests.conftest import small_experiment


def test_thin_factors_are_the_update_and_a_function_of_it_alone() -> None:
    generator = torch.Generator().manual_seed(0)
    signals = torch.randn(3, 12, 64, generator=generator, dtype=torch.float64)
    inputs = torch.rand(3, 12, 200, generator=generator, dtype=torch.float64)
    signals[1, 8:] = 0.0  # padding rows add nothing: client 1 has rank 8
    inputs[2, 6:] = inputs[2, :6]  # repeated samples: client 2 has rank at most 6
    factors = thin_factors(signals, inputs)
    assert [right.shape[1] for _, right in factors] == [12, 8, 6]
    # a different set of rows behind the same updates: M G and M^-T A for an invertible M
    mixing = torch.randn(3, 12, 12, generator=generator, dtype=torch.float64) + 4 * torch.eye(12, dtype=torch.float64)
    again = thin_factors(mixing @ signals, torch.linalg.solve(mixing.transpose(1, 2), inputs))
    for c, ((left, right), (left2, right2)) in enumerate(zip(factors, again, strict=True)):
        formed = signals[c].T @ inputs[c]
        scale = formed.abs().max()
        # float64 round-off of a product of 12-term sums, relative to the largest entry
        assert (left @ right.T - formed).abs().max() <= 1e-12 * scale
        torch.testing.assert_close(right.T @ right, torch.eye(right.shape[1], dtype=torch.float64), atol=1e-12, rtol=0)
        assert (right.abs().argmax(dim=0) == (right.argmax(dim=0))).all()  # each column's peak is positive
        # the same factors, to the conditioning of the random M (singular values are well separated here)
        torch.testing.assert_close(right2, right, atol=1e-8, rtol=0)
        torch.testing.assert_close(left2, left, atol=1e-8 * float(scale), rtol=0)


def test_a_faint_sample_keeps_its_own_rows() -> None:
    """A confident sample drives a few units with a tiny error signal: dense-ratio uses such rows (|gb_j|
    above 1e-6 of the largest), so the factors must keep them as exact as the formed update does."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.rand(1, 64, 784, generator=generator, dtype=torch.float64)
    signals = torch.randn(1, 64, 256, generator=generator, dtype=torch.float64)
    signals[0, :, :4] = 0.0
    signals[0, 5] *= 1e-9  # sample 5: a billionth of the others' signal, and alone on units 0-3
    signals[0, 5, :4] = 3e-9
    [(left, right)] = thin_factors(signals, inputs)
    rows = left[:4] @ right.T
    cosine = (rows @ inputs[0, 5]) / (rows.norm(dim=1) * inputs[0, 5].norm())
    assert right.shape[1] == 64 and (1 - cosine).abs().max() < 1e-9


def test_worth_factoring_needs_a_thin_update() -> None:
    assert worth_factoring(32, 256, 784) and not worth_factoring(32, 64, 784) and not worth_factoring(16, 32, 784)


def _chunk(hidden: int, batch: int, attack: Any = "dense-ratio") -> tuple[Any, Any, Any, Any]:
    data = small_experiment(
        {"uri": "sqlite:///unused.db"},
        model={"name": "mlp", "hidden": [hidden]},
        clients=[{"group": "a", "count": 8, "batch_size": batch}],
        attack={"name": attack},
    )
    experiment = validate(data)
    prepared = prepare_data(experiment)
    dataset = prepared.dataset
    context = SimulationContext.build(
        experiment, dataset.train_x, dataset.train_y, prepared.partition, dataset.num_classes
    )
    params = initial_params(experiment, dataset)
    clients = np.arange(8)
    task = ChunkTask(index=0, round=1, group=0, clients=clients, audited=clients[:5])
    _, payload = simulate_chunk(context, params, task)
    return experiment, dataset, params, payload


def test_a_fused_chunk_sends_its_audited_first_layers_factored() -> None:
    experiment, dataset, params, payload = _chunk(hidden=256, batch=8)
    assert len(payload.audited) == 5
    for update in payload.audited:
        assert set(update.factors) == {"1.weight"} and "1.weight" not in update.update
        left, right = update.factors["1.weight"]
        assert right.shape[1] <= update.num_samples
        back = pickle.loads(pickle.dumps(update, protocol=5))
        assert isinstance(back, ClientUpdate) and torch.equal(back.factors["1.weight"][0], left)
    # the same chunk with the factoring off gives the formed updates: equal to float32 round-off
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(simulation, "worth_factoring", lambda *_: False)
        _, _, _, formed_payload = _chunk(hidden=256, batch=8)
    for update, formed in zip(payload.audited, formed_payload.audited, strict=True):
        assert not formed.factors
        for key, value in formed.update.items():
            rebuilt = update.formed()[key]
            assert rebuilt.dtype == value.dtype
            # float32 products of 8-term sums against float64 factors: a few float32 ulps of the largest entry
            assert (rebuilt - value).abs().max() <= 1e-5 * value.abs().max()
            if key != "1.weight":
                assert torch.equal(update.update[key], value)
    # dense-ratio reads the factors directly, and recovers what it recovers from the formed update
    net = attack_model(experiment, dataset.input_shape, dataset.num_classes)
    attack = DenseRatio()
    args = (params, net, experiment, dataset.input_shape, dataset.num_classes, CrossEntropy())
    factored_views = [attacker_view(update, *args, keep_factors=True) for update in payload.audited]
    together = attack.reconstruct_many(factored_views)  # all factored views ranked in one batch
    for update, formed, factored_view, batched in zip(
        payload.audited, formed_payload.audited, factored_views, together, strict=True
    ):
        assert "1.weight" in factored_view.factors and "1.weight" not in factored_view.update
        plain_view = attacker_view(formed, *args)
        mine, theirs = attack.reconstruct(factored_view), attack.reconstruct(plain_view)
        assert mine.images.shape == theirs.images.shape == batched.images.shape
        # the same rows kept; each image is a row over its bias, from float32 W against float64 factors
        torch.testing.assert_close(mine.images, theirs.images, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batched.images, mine.images, atol=1e-6, rtol=1e-6)
        assert batched.diagnostics["top_support"] == theirs.diagnostics["top_support"]
        # without keep_factors the view holds the weight multiplied out, as any other attack needs it
        assert "1.weight" in attacker_view(update, *args).update


def test_a_wide_batch_or_an_attack_that_needs_the_matrix_gets_it_formed() -> None:
    for payload in (_chunk(hidden=32, batch=16)[3], _chunk(256, 8, ["dense-ratio", "inverting-gradients"])[3]):
        assert payload.audited
        assert all(not update.factors and "1.weight" in update.update for update in payload.audited)


def test_the_torch_path_of_the_factorisation_gives_the_numpy_paths_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA chunks factor through torch's linear algebra, CPU ones through numpy's: the same factors (the
    torch path runs here on the CPU, so CI checks its arithmetic without a GPU)."""
    generator = torch.Generator().manual_seed(2)
    signals = torch.randn(4, 16, 64, generator=generator, dtype=torch.float64)
    inputs = torch.rand(4, 16, 200, generator=generator, dtype=torch.float64)
    signals[3, 10:] = 0.0
    through_numpy = thin_factors(signals, inputs)
    monkeypatch.setattr(low_rank, "_through_numpy", lambda _: False)
    through_torch = thin_factors(signals, inputs)
    for (left, right), (left2, right2) in zip(through_numpy, through_torch, strict=True):
        assert right.shape == right2.shape
        # two LAPACK builds on the same well-separated problem: equal to the conditioning times round-off
        torch.testing.assert_close(right2, right, atol=1e-9, rtol=0)
        torch.testing.assert_close(left2, left, atol=1e-9 * float(left.abs().max()), rtol=0)


@pytest.mark.parametrize("column", [[1.0, -1.0, 0.5, 0.25], [1.0, -0.9, 0.5, 0.25], [-0.3, 0.5, -0.5, 0.1]])
def test_the_sign_rule_is_canonical_even_when_the_largest_entries_tie(
    column: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank-1 update whose V column has (or has not) equal largest positive and negative entries: flipping
    the sign of the SVD that LAPACK returns (an equally valid SVD) gives the same factors."""
    signals = torch.tensor([[[1.0, 2.0, 0.5]]], dtype=torch.float64)
    inputs = torch.tensor([[column]], dtype=torch.float64)
    [(left, right)] = thin_factors(signals, inputs)
    plain = low_rank._svd
    monkeypatch.setattr(low_rank, "_svd", lambda matrix: (-plain(matrix)[0], plain(matrix)[1]))
    [(left2, right2)] = thin_factors(signals, inputs)
    assert torch.equal(right, right2) and torch.equal(left, left2)
    largest = right[:, 0].abs().max()
    assert right[int(torch.nonzero(right[:, 0].abs() == largest)[0]), 0] > 0  # the first largest entry positive


@pytest.mark.parametrize("thresholds", [(1.0, 0.99), (1 - 1e-6, 1.0), (1 - 1e-6, 0.99), (0.9, 0.8)])
def test_factored_views_rank_as_the_float64_cosines_of_their_factors(thresholds: tuple[float, float]) -> None:
    """Batched ranking of factored views (projection screen, or one by one for thresholds at 1) keeps the rows
    rank_by_similarity keeps on the float64 cosine matrix of each view's usable rows of L."""
    copy, dedup = thresholds
    experiment, dataset, params, payload = _chunk(hidden=256, batch=8)
    net = attack_model(experiment, dataset.input_shape, dataset.num_classes)
    args = (params, net, experiment, dataset.input_shape, dataset.num_classes, CrossEntropy())
    views = [attacker_view(update, *args, keep_factors=True) for update in payload.audited]
    attack = DenseRatio(copy_cosine=copy, dedup_cosine=dedup)
    for view, result in zip(views, attack.reconstruct_many(views), strict=True):
        bias = summed_gradient(view, "1.bias")
        usable = torch.nonzero(bias.abs() > attack.params["tol"] * bias.abs().max()).flatten()
        left, _ = gradient_factors(view, "1.weight")
        rows = left[usable] * torch.sign(bias[usable])[:, None]
        unit = rows / rows.norm(dim=1, keepdim=True)
        kept, support = rank_by_similarity((unit @ unit.T).numpy(), bias.abs()[usable].numpy(), 8, copy, dedup)
        expected = gradient_rows(view, "1.weight", usable[kept]) / bias[usable[kept], None]
        assert result.images.shape[0] == len(kept)
        # float32 product of float64 factors: a few float32 round-offs of the largest pixel
        torch.testing.assert_close(result.images.reshape(len(kept), -1), expected.float(), atol=1e-6, rtol=1e-5)
        assert result.diagnostics["top_support"] == float(support[0])
