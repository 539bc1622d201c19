"""DP-SGD clients: per-example clipping, the noise, the vectorised update, sampling and the accountant."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch.func import functional_call

from defenses import DPSGD, DefenceConfigError, build_policy, epsilon, poisson_sample, sample_rate
from testbed.cli import main
from testbed.config.topology import validate
from testbed.runtime.dp_update import dense_clipped_sums, dp_local_steps, dp_updates, per_example_gradients
from testbed.runtime.local_update import StackedBatches
from testbed.runtime.models import build_model
from testbed.runtime.preparation import initial_params, prepare_data
from testbed.runtime.records import ChunkTask
from testbed.runtime.round_metrics import privacy_metrics, privacy_plan
from testbed.runtime.simulation import SimulationContext, _fused_path_applies, plan_batches, simulate_chunk

DP = {"clip": 0.5, "noise_multiplier": 1.3, "delta": 1e-5}


def _model(
    name: str, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], tuple[int, ...]]:
    shape = (1, 28, 28) if name == "lenet" else (1, 12, 12)
    model = build_model(name, shape, 10, hidden=[16], activation="sigmoid", seed=3).to(dtype)
    params = {key: value.detach().clone() for key, value in model.named_parameters()}
    return model, params, shape


def _data(
    clients: int, width: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    x = 4 * torch.rand(clients, width, *shape, generator=generator, dtype=dtype)  # large inputs: large gradients
    y = torch.randint(0, 10, (clients, width), generator=generator)
    return x, y


# --- clipping -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["mlp", "lenet", "cnn"])
def test_clipping_bounds_every_per_example_contribution(model_name: str) -> None:
    """Each example alone (W = 1) gives its clipped contribution: norm at most C, unchanged when within C."""
    model, params, shape = _model(model_name, torch.float64)
    loss = build_policy(None).loss
    x, y = _data(3, 7, shape, torch.float64)
    gradients = per_example_gradients(model, loss, params, x, y, shared=True)
    norms = torch.sqrt(sum(v.flatten(2).pow(2).sum(2) for v in gradients.values()))  # (3, 7)
    clip = float(norms.median())  # about half the examples above the bound, half within it
    dp = DPSGD(clip=clip, noise_multiplier=1.0, delta=1e-5)
    alone = {key: value.reshape(21, 1, *value.shape[2:]) for key, value in gradients.items()}
    clipped = dp.clipped_sum(alone, torch.ones(21, 1, dtype=torch.float64))
    after = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in clipped.values()))
    before = norms.reshape(21)
    # float64 round-off of a norm of a few thousand terms is below 1e-12 relative
    assert bool((after <= clip * (1 + 1e-12)).all()), (after.max(), clip)
    above = before > clip
    assert 0 < int(above.sum()) < 21
    torch.testing.assert_close(after[above], torch.full_like(after[above], clip), rtol=1e-12, atol=0)
    for key, value in clipped.items():  # within the bound: the gradient itself
        torch.testing.assert_close(value[~above], alone[key][~above, 0], rtol=0, atol=0)


def test_padding_contributes_nothing_and_float32_clipping_holds() -> None:
    model, params, shape = _model("mlp")
    loss = build_policy(None).loss
    x, y = _data(2, 5, shape, torch.float32)
    gradients = per_example_gradients(model, loss, params, x, y, shared=True)
    dp = DPSGD(clip=1e-3, noise_multiplier=1.0, delta=1e-5)
    weights = torch.tensor([[1.0, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    summed = dp.clipped_sum(gradients, weights)
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in summed.values()))
    # at most 3 and 1 contributions of norm <= C each; float32 (unit round-off 6e-8) sums of ~2,000 terms
    assert float(norms[0]) <= 3e-3 * (1 + 1e-4)
    assert float(norms[1]) <= 1e-3 * (1 + 1e-4)


# --- the update against a hand computation -------------------------------------------------------------


def _hand_update(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    dp: DPSGD,
    normaliser: float,
    generator: torch.Generator,
    lr: float | None,
) -> dict[str, torch.Tensor]:
    """One client by plain autograd, one example at a time: clip, sum, add noise, divide, step."""
    local = {key: value.clone() for key, value in params.items()}
    size = sum(value.numel() for value in params.values())
    for x, y in batches:
        total = {key: torch.zeros_like(value) for key, value in local.items()}
        for xi, yi in zip(x, y, strict=True):
            leaves = {key: value.detach().requires_grad_(True) for key, value in local.items()}
            logits = functional_call(model, leaves, (xi.unsqueeze(0),))
            value = torch.nn.functional.cross_entropy(logits, yi.unsqueeze(0))
            grads = torch.autograd.grad(value, list(leaves.values()))
            norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
            factor = min(1.0, dp.clip / norm)
            for key, g in zip(leaves, grads, strict=True):
                total[key] += factor * g
        noise = torch.randn(size, generator=generator, dtype=torch.float32)
        pieces = torch.split(noise, [value.numel() for value in local.values()])
        step = {
            key: (total[key] + dp.noise_std * piece.reshape(total[key].shape).to(total[key].dtype)) / normaliser
            for key, piece in zip(local, pieces, strict=True)
        }
        if lr is None:
            return step
        local = {key: local[key] - lr * step[key] for key in local}
    return {key: local[key] - params[key] for key in local}


def _stack(batches: list[list[tuple[torch.Tensor, torch.Tensor]]], shape: tuple[int, ...]) -> StackedBatches:
    steps = max(len(b) for b in batches)
    width = max(1, max(len(y) for b in batches for _, y in b))
    x = torch.zeros(len(batches), steps, width, *shape)
    y = torch.zeros(len(batches), steps, width, dtype=torch.int64)
    w = torch.zeros(len(batches), steps, width)
    for c, client in enumerate(batches):
        for s, (xb, yb) in enumerate(client):
            x[c, s, : len(yb)], y[c, s, : len(yb)], w[c, s, : len(yb)] = xb, yb, 1.0
    return StackedBatches(x, y, w)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("lr", [None, 0.2], ids=["fedsgd", "fedavg"])
def test_vectorised_dp_update_equals_the_hand_computation(model_name: str, lr: float | None) -> None:
    """Clients with ragged batch sizes, an empty batch and different step counts; noise from seeded streams."""
    model, params, shape = _model(model_name)
    generator = torch.Generator().manual_seed(5)
    sizes = [[4, 0, 3], [2, 5], [6]] if lr is not None else [[4], [0], [6]]
    batches = [
        [(4 * torch.rand(n, *shape, generator=generator), torch.randint(0, 10, (n,), generator=generator)) for n in s]
        for s in sizes
    ]
    dp = DPSGD(clip=0.3, noise_multiplier=0.7, delta=1e-5)
    normaliser = torch.tensor([4.0, 3.0, 5.0])
    streams = [torch.Generator().manual_seed(100 + c) for c in range(3)]
    steps = [len(s) for s in sizes]
    update = dp_updates(
        model, build_policy(None).loss, dp, params, _stack(batches, shape), steps, normaliser, streams, lr
    )
    for c in range(3):
        expected = _hand_update(
            model, params, batches[c], dp, float(normaliser[c]), torch.Generator().manual_seed(100 + c), lr
        )
        for key in params:
            torch.testing.assert_close(update[key][c], expected[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_name", ["softmax", "mlp"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-client"])
def test_dense_clipped_sums_equal_those_of_per_example_gradients(model_name: str, shared: bool) -> None:
    """The dense-layer shortcut (no per-example gradient formed) against vmap's per-example gradients."""
    model, params, shape = _model(model_name, torch.float64)
    if not shared:  # different weights per client
        generator = torch.Generator().manual_seed(9)
        params = {k: v + 0.1 * torch.randn(3, *v.shape, generator=generator, dtype=v.dtype) for k, v in params.items()}
    loss = build_policy({"loss": "label-smoothing"}).loss
    x, y = _data(3, 6, shape, torch.float64)
    w = torch.tensor([[1.0, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    gradients = per_example_gradients(model, loss, params, x, y, shared=shared)
    norms = torch.sqrt(sum(v.flatten(2).pow(2).sum(2) for v in gradients.values()))
    dp = DPSGD(clip=float(norms[w > 0].median()), noise_multiplier=1.0, delta=1e-5)
    fast = dense_clipped_sums(model, loss, dp, params, (x, y, w), shared=shared)
    slow = dp.clipped_sum(gradients, w)
    assert list(fast) == list(params)
    for key in params:  # float64 round-off of sums of a few thousand terms: far below 1e-10
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-10, atol=1e-12)
    assert float(sum(v[2].abs().sum() for v in fast.values())) == 0.0  # a client with no example adds nothing


def test_noise_has_the_stated_standard_deviation_and_is_each_clients_own() -> None:
    dp = DPSGD(clip=0.5, noise_multiplier=1.3, delta=1e-5)
    zeros = {"a": torch.zeros(4, 300, 100), "b": torch.zeros(4, 2000)}
    streams = [torch.Generator().manual_seed(c) for c in range(4)]
    noisy = dp.privatise(zeros, torch.full((4,), 2.0), streams)
    draws = torch.cat([value.reshape(4, -1) for value in noisy.values()], dim=1).double() * 2.0  # undo the normaliser
    n = draws.numel()
    std = dp.noise_std  # 0.65
    # sample mean ~ N(0, std^2 / n), sample variance ~ std^2 (1 +- sqrt(2 / n)): six standard errors each
    assert abs(float(draws.mean())) < 6 * std / math.sqrt(n)
    assert abs(float(draws.var()) / std**2 - 1) < 6 * math.sqrt(2 / n)
    # a client's noise depends only on its own stream, not on who shares the stack
    alone = dp.privatise(
        {k: v[2:3] for k, v in zeros.items()}, torch.full((1,), 2.0), [torch.Generator().manual_seed(2)]
    )
    for key in zeros:
        torch.testing.assert_close(alone[key][0], noisy[key][2], rtol=0, atol=0)


# --- Poisson sampling -------------------------------------------------------------------------------------


def test_poisson_batches_have_the_expected_size() -> None:
    rng = np.random.default_rng(0)
    n, batch = 200, 16
    rate = sample_rate(n, batch)
    sizes = np.array([len(poisson_sample(n, rate, rng)) for _ in range(4000)])
    # Binomial(200, 0.08): mean 16, variance 14.72; six standard errors of the mean of 4,000 draws
    assert abs(sizes.mean() - batch) < 6 * math.sqrt(n * rate * (1 - rate) / len(sizes))
    assert abs(sizes.var() / (n * rate * (1 - rate)) - 1) < 0.15
    assert sample_rate(10, 16) == 1.0
    assert len(poisson_sample(10, 1.0, rng)) == 10


# --- the accountant ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize(
    ("rate", "sigma", "steps", "delta"), [(0.01, 1.1, 1000, 1e-5), (0.08, 0.8, 37, 1e-6), (1.0, 2.0, 5, 1e-5)]
)
def test_epsilon_equals_the_librarys_value(
    accountant: str, rate: float, sigma: float, steps: int, delta: float
) -> None:
    from opacus.accountants import PRVAccountant, RDPAccountant

    library = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for _ in range(steps):
        library.step(noise_multiplier=sigma, sample_rate=rate)
    with np.errstate(divide="ignore"):
        expected = library.get_epsilon(delta=delta)
    ours = epsilon(sigma, rate, steps, delta, accountant)
    assert ours == pytest.approx(expected, rel=1e-6)
    assert DPSGD(clip=1.0, noise_multiplier=sigma, delta=delta, accountant=accountant).epsilon(rate, steps) == ours
    assert epsilon(sigma, rate, 0, delta, accountant) == 0.0


def _experiment(algorithm: dict[str, Any], clients: list[dict[str, Any]]) -> Any:
    return validate(
        {
            "name": "dp",
            "rounds": 3,
            "dataset": {
                "name": "mnist-5k",
                "max_train": 600,
                "max_test": 200,
                "partition": {"scheme": "dirichlet", "alpha": 0.5},
            },
            "model": {"name": "mlp", "hidden": [16]},
            "algorithm": algorithm,
            "clients": clients,
        }
    )


@pytest.mark.parametrize(
    "algorithm",
    [{"name": "fedsgd"}, {"name": "fedavg", "local_steps": 3}, {"name": "fedavg", "local_epochs": 2}],
    ids=["fedsgd", "steps", "epochs"],
)
def test_logged_epsilon_is_the_worst_client_of_the_group(algorithm: dict[str, Any]) -> None:
    dp = {**DP, "accountant": "rdp"}
    experiment = _experiment(
        algorithm,
        [
            {"group": "plain", "count": 5, "batch_size": 8},
            {"group": "private", "count": 12, "batch_size": 8, "defence": {"dp": dp}},
        ],
    )
    sizes = np.array([50, 60, 70, 80, 90, 9, 20, 33, 40, 41, 64, 100, 130, 200, 16, 17, 300])
    plan = privacy_plan(experiment, sizes)
    assert [group.group for group in plan] == ["private"]
    for rounds in (1, 3):
        metrics = privacy_metrics(plan, rounds)
        assert set(metrics) == {
            f"privacy/private/{key}" for key in ("epsilon", "delta", "sample_rate", "steps", "noise_multiplier")
        }
        brute = max(
            epsilon(
                DP["noise_multiplier"],
                sample_rate(int(n), 8),
                rounds * dp_local_steps(experiment.algorithm, int(n), 8),
                DP["delta"],
            )
            for n in sizes[5:]
        )
        assert metrics["privacy/private/epsilon"] == pytest.approx(brute, rel=1e-12)
    if algorithm["name"] == "fedsgd":
        assert plan[0].regimes == ((8 / 9, 1),)  # the smallest client (9 samples) has the largest rate


# --- the simulator -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def context() -> tuple[SimulationContext, dict[str, torch.Tensor]]:
    experiment = _experiment(
        {"name": "fedavg", "lr": 0.1, "local_epochs": 1},
        [{"group": "private", "count": 12, "batch_size": 8, "defence": {"dp": DP}}],
    )
    data = prepare_data(experiment)
    dataset = data.dataset
    built = SimulationContext.build(experiment, dataset.train_x, dataset.train_y, data.partition, dataset.num_classes)
    return built, initial_params(experiment, dataset)


def test_dp_groups_plan_poisson_batches_and_never_fuse(context: tuple[SimulationContext, Any]) -> None:
    built, _ = context
    group = built.groups[0]
    clients = np.arange(12)
    index, short = plan_batches(built, group, clients, round_index=0)
    assert built.dense_stack and not _fused_path_applies(built, group, index)
    assert short == 0
    for row, client in enumerate(clients):
        owned = built.partition.client(int(client))
        steps = dp_local_steps(built.experiment.algorithm, len(owned), 8)
        assert bool((index[row, steps:] == -1).all())
        for batch in index[row, :steps]:
            chosen = batch[batch >= 0]
            assert len(set(chosen.tolist())) == len(chosen) and set(chosen.tolist()) <= set(owned.tolist())
    again, _ = plan_batches(built, group, clients[3:5], round_index=0)  # a client's batches are its own
    for row in range(2):
        for step in range(again.shape[1]):
            mine, before = again[row, step], index[3 + row, step]
            np.testing.assert_array_equal(mine[mine >= 0], before[before >= 0])


def test_a_clients_dp_update_does_not_depend_on_its_chunk(context: tuple[SimulationContext, Any]) -> None:
    built, params = context
    clients = np.arange(12)
    _, whole = simulate_chunk(built, params, ChunkTask(0, 0, 0, clients, clients[:0]))
    parts = [
        simulate_chunk(built, params, ChunkTask(i, 0, 0, half, half[:0]))[1]
        for i, half in enumerate((clients[:5], clients[5:]))
    ]
    assert whole.weighted_sum is not None and all(part.weighted_sum is not None for part in parts)
    for key, value in whole.weighted_sum.items():
        torch.testing.assert_close(value, parts[0].weighted_sum[key] + parts[1].weighted_sum[key], rtol=1e-4, atol=1e-4)
    assert whole.weight == sum(len(built.partition.client(c)) for c in range(12))


# --- configuration errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("defence", "expected"),
    [
        ({"dp": {**DP, "clip": 0}}, "defence.dp.clip: a positive finite number, got 0.0"),
        ({"dp": {**DP, "noise_multiplier": -1}}, "defence.dp.noise_multiplier: a positive finite number"),
        ({"dp": {**DP, "delta": 1}}, "defence.dp.delta: a number in (0, 1)"),
        ({"dp": {**DP, "accountant": "gdp"}}, "defence.dp.accountant: expected one of 'rdp', 'prv'"),
        ({"dp": {"clip": 1.0, "delta": 1e-5}}, "defence.dp.noise_multiplier: required by dp"),
        ({"dp": {**DP, "sigma": 1}}, "defence.dp.sigma: unknown parameter of dp"),
        ({"dp": 1.0}, "defence.dp: expected a mapping of dp parameters"),
        ({"dp": DP, "batching": "identical-labels"}, "defence.batching: not allowed with dp"),
    ],
)
def test_bad_dp_settings_are_one_line_naming_the_field(defence: dict[str, Any], expected: str) -> None:
    with pytest.raises(DefenceConfigError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
        build_policy(defence)


def test_bad_dp_setting_in_a_topology_names_the_client_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {
        "name": "x",
        "rounds": 1,
        "clients": [{"group": "a", "count": 2, "batch_size": 4, "defence": {"dp": {**DP, "clip": -1}}}],
    }
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "clients[0].defence.dp.clip: a positive finite number, got -1.0" in err


def test_dp_policy_describes_its_settings() -> None:
    policy = build_policy(
        {"dp": {"clip": "1.0", "noise-multiplier": 1.1, "delta": "1e-5"}, "update": [{"quantize": 8}]}
    )
    assert policy.dp == DPSGD(clip=1.0, noise_multiplier=1.1, delta=1e-5, accountant="rdp")
    assert policy.describe()["dp"] == {
        "name": "dp",
        "clip": 1.0,
        "noise_multiplier": 1.1,
        "delta": 1e-5,
        "accountant": "rdp",
    }
    assert "dp" not in build_policy(None).describe()


def test_audited_clients_without_samples_are_not_handed_to_the_attack() -> None:
    """A DP-SGD client whose Poisson batch came out empty, and an identical-labels client whose labels are all
    below ``min_batch``, train on nothing: they send no attackable update (an empty view was an error)."""
    experiment = _experiment(
        {"name": "fedsgd", "lr": 0.1},
        [
            {"group": "private", "count": 30, "batch_size": 1, "defence": {"dp": DP}},
            {"group": "mixed", "count": 10, "batch_size": 8, "defence": {"batching": {"identical-labels": 60}}},
        ],
    )
    data = prepare_data(experiment)
    dataset = data.dataset
    built = SimulationContext.build(experiment, dataset.train_x, dataset.train_y, data.partition, dataset.num_classes)
    params = initial_params(experiment, dataset)
    empty = 0
    for group, clients in ((0, np.arange(30)), (1, np.arange(30, 40))):
        summary, payload = simulate_chunk(built, params, ChunkTask(group, 0, group, clients, clients))
        index, _ = plan_batches(built, built.groups[group], clients, 0)
        has_samples = {int(c) for c, rows in zip(clients, index, strict=True) if (rows >= 0).any()}
        empty += len(clients) - len(has_samples)
        assert {update.client for update in payload.audited} == has_samples == set(summary.ground_truth)
        assert all(update.num_samples >= 1 for update in payload.audited)
    assert empty > 0  # the case happened: batch rate 1/n per client and labels rarer than 60 samples
