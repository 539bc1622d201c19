"""A model by import path: building, one-line errors before Ray starts, and BatchNorm on the vectorised path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from defenses import CrossEntropy, build_policy
from testbed.config.load import load_experiment
from testbed.config.schema import ModelConfig
from testbed.config.topology import validate
from testbed.errors import UserError
from testbed.runtime.aggregation import combine, server_step
from testbed.runtime.buffers import (
    buffer_contribution,
    initial_state,
    mean_buffers,
    merge_buffers,
    split_state,
    stateful_update,
)
from testbed.runtime.fused import is_dense_stack
from testbed.runtime.local_update import StackedBatches, evaluate
from testbed.runtime.models import model_for
from testbed.runtime.preparation import prepare_data
from testbed.runtime.records import ChunkPayload
from testbed.runtime.user_models import code_locations, runtime_env
from tests.support.user_code import BATCHNORM_NET, write_module

EPS = torch.finfo(torch.float32).eps


def _close(actual: torch.Tensor, expected: torch.Tensor, terms: int) -> None:
    """Equal up to float32 summation in another order: |error| <= terms * eps * the largest magnitude involved.

    Summing ``terms`` float32 numbers in any order is exact to within terms * eps times the sum of their
    magnitudes (the standard bound of recursive summation), which the largest value of the result times
    the number of terms bounds from above for the sums of like-signed terms met here.
    """
    scale = float(expected.abs().max()) + float(actual.abs().max()) + 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0.0, atol=terms * EPS * scale)


@pytest.fixture
def bn_module(tmp_path: Path) -> tuple[str, str]:
    """(module name, folder) of a fresh copy of the user's BatchNorm network file."""
    return write_module(tmp_path, BATCHNORM_NET), str(tmp_path)


def _config(name: str, folder: str, **params: Any) -> ModelConfig:
    return ModelConfig(name=name, path=folder, params=params)


def test_callable_gets_num_classes_params_and_input_shape_and_seeded_weights(bn_module: tuple[str, str]) -> None:
    module, folder = bn_module
    config = _config(f"{module}:small_bn_net", folder, width=4)
    a, b = (model_for(config, (1, 28, 28), 10, seed=5) for _ in range(2))
    assert isinstance(a, nn.Sequential) and a[0].out_channels == 4 and a[-1].out_features == 10
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    other = model_for(config, (1, 28, 28), 10, seed=6)
    assert not torch.equal(a[0].weight, other[0].weight)
    net = model_for(_config(f"{module}:Net", folder), (1, 28, 28), 3)  # takes no input_shape: none is passed
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 3)


def test_a_torchvision_resnet_by_import_path() -> None:
    config = ModelConfig(name="torchvision.models:resnet18", params={"weights": None})
    model = model_for(config, (3, 32, 32), 10, seed=0)
    state = initial_state(model)
    params, buffers = split_state(model, state)
    assert set(params) == {name for name, _ in model.named_parameters()}
    assert "bn1.running_mean" in buffers and buffers["bn1.num_batches_tracked"].dtype == torch.int64
    assert not is_dense_stack(model)
    assert code_locations(validate(_minimal(model=config.model_dump()))) == []  # installed: nothing to ship


def _minimal(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "t",
        "rounds": 1,
        "dataset": {"name": "mnist-5k", "max_train": 400, "max_test": 50},
        "clients": [{"group": "a", "count": 4, "batch_size": 8}],
    }
    data.update(changes)
    return data


@pytest.mark.parametrize(
    ("attribute", "expected"),
    [
        ("NOT_CALLABLE", "model.name: '{m}:NOT_CALLABLE' is not callable (it is a int)"),
        ("absent", "model.name: '{m}' has no attribute 'absent'"),
        ("not_a_module", "model.name: {m}:not_a_module returned a list, not a torch.nn.Module"),
        ("failing", "model.name: {m}:failing(num_classes=10) failed: RuntimeError: no weights here"),
        (
            "wrong_size",
            "model.name: {m}:wrong_size gives outputs (2, 11) for a batch of 2 images of shape (1, 28, 28); "
            "expected (2, 10): one logit per class",
        ),
        ("cumulative_bn", "model.name: {m}:cumulative_bn: layer '1' (BatchNorm2d) has momentum=None"),
    ],
)
def test_model_problems_are_one_line_user_errors_before_ray(
    bn_module: tuple[str, str], attribute: str, expected: str
) -> None:
    module, folder = bn_module
    experiment = validate(_minimal(model={"name": f"{module}:{attribute}", "path": folder}))
    with pytest.raises(UserError) as info:
        prepare_data(experiment)
    message = str(info.value)
    assert message.startswith(expected.format(m=module)), message
    assert "\n" not in message


def test_missing_module_and_broken_module_are_one_line(tmp_path: Path) -> None:
    broken = write_module(tmp_path, "import torch\ndef net(num_classes):\n    return torch.nn.Linear(1, \n")
    needs = write_module(tmp_path, "import not_installed_anywhere\n")
    cases = {
        "no_such_module_here:net": "model.name: cannot import 'no_such_module_here': no module "
        f"'no_such_module_here' in {tmp_path}, the working directory or PYTHONPATH",
        f"{broken}:net": f"model.name: importing '{broken}' failed: SyntaxError:",
        f"{needs}:net": f"model.name: importing '{needs}' failed: ModuleNotFoundError: No module named "
        "'not_installed_anywhere'",
    }
    for name, expected in cases.items():
        with pytest.raises(UserError) as info:
            prepare_data(validate(_minimal(model={"name": name, "path": str(tmp_path)})))
        assert str(info.value).startswith(expected), str(info.value)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"name": "resnet"}, "unknown model 'resnet'; allowed: softmax, mlp, lenet, cnn, or an import path"),
        ({"name": "mlp", "params": {"depth": 2}}, "model.params: only an import-path model.name takes params"),
        ({"name": "a.b:c", "hidden": [8]}, "model.hidden: applies to the built-in models"),
        ({"name": "a.b:c", "activation": "relu"}, "model.activation: applies to the built-in models"),
        ({"name": "a.b:c", "params": {"num_classes": 3}}, "model.params: num_classes come from the data set"),
        ({"name": "a.b:"}, "unknown model 'a.b:'"),
    ],
)
def test_model_block_is_checked_by_the_schema(model: dict[str, Any], expected: str) -> None:
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        validate(_minimal(model=model))


def test_loading_records_the_folder_that_holds_the_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    topology = tmp_path / "topologies"
    code = tmp_path / "code"
    topology.mkdir()
    code.mkdir()
    beside = write_module(topology, BATCHNORM_NET)
    elsewhere = write_module(code, BATCHNORM_NET)
    monkeypatch.chdir(code)
    path = topology / "t.yaml"
    clients = "clients: [{group: a, count: 2, batch_size: 1}]\n"
    for name, folder in (
        (f"{beside}:Net", topology),
        (f"{elsewhere}:Net", code),
        ("torchvision.models:resnet18", None),
    ):
        path.write_text(f"name: t\nrounds: 1\nmodel: {{name: '{name}'}}\n{clients}", encoding="utf-8")
        assert load_experiment(path).model.path == (str(folder.resolve()) if folder else None), name
    path.write_text(
        f"name: t\nrounds: 1\nmodel: {{name: '{elsewhere}:Net', path: ../code}}\n{clients}", encoding="utf-8"
    )
    assert load_experiment(path).model.path == str(code.resolve())


def test_runtime_environment_carries_the_user_module(
    bn_module: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    module, folder = bn_module
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    experiment = validate(_minimal(model={"name": f"{module}:small_bn_net", "path": folder}))
    assert runtime_env(experiment, joined=False) == {"env_vars": {"PYTHONPATH": f"{folder}:/somewhere/else"}}
    assert runtime_env(experiment, joined=True) == {"py_modules": [str(Path(folder).resolve() / f"{module}.py")]}
    assert runtime_env(validate(_minimal()), joined=False) == {}


def _bn_setup(seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3), nn.BatchNorm1d(3)
    )
    params, buffers = split_state(model, initial_state(model))
    return model, params, buffers


SIZES = [[5, 5, 5], [5, 5, 2], [4, 0, 0], [1, 5, 1]]
"""Real samples per client and local step: full, a short last batch, fewer steps, single-sample batches."""


def _batches(seed: int = 1) -> StackedBatches:
    generator = torch.Generator().manual_seed(seed)
    clients, steps, width = len(SIZES), len(SIZES[0]), 5
    x = torch.rand(clients, steps, width, 1, 8, 8, generator=generator)
    y = torch.randint(0, 3, (clients, steps, width), generator=generator)
    w = torch.zeros(clients, steps, width)
    for client, sizes in enumerate(SIZES):
        for step, size in enumerate(sizes):
            w[client, step, :size] = 1.0
    return StackedBatches(x, y, w)


def _one_client(
    model: nn.Module, batches: StackedBatches, client: int, lr: float | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The client's update and buffers by plain autograd on a copy of the model in train mode."""
    own = copy.deepcopy(model).train()
    start = {name: value.detach().clone() for name, value in own.named_parameters()}
    loss = build_policy({}).loss
    grads: dict[str, torch.Tensor] = {}
    for step in range(1 if lr is None else batches.steps):
        size = int(batches.w[client, step].sum())
        if size == 0:
            continue
        x, y = batches.x[client, step, :size], batches.y[client, step, :size]
        kept = copy.deepcopy(own.state_dict())
        try:
            value = loss.per_sample(own(x), y).mean()
        except ValueError:  # one value per channel: PyTorch cannot normalise it, the step is skipped
            assert size == 1
            own.load_state_dict(kept)  # as if the step had not begun (earlier layers updated their statistics)
            continue
        grads = dict(zip(start, torch.autograd.grad(value, list(own.parameters())), strict=True))
        if lr is not None:
            with torch.no_grad():
                for name, parameter in own.named_parameters():
                    parameter -= lr * grads[name]
    buffers = {name: value.detach().clone() for name, value in own.named_buffers()}
    if lr is None:
        return grads or {name: torch.zeros_like(value) for name, value in start.items()}, buffers
    return {name: value.detach() - start[name] for name, value in own.named_parameters()}, buffers


@pytest.mark.parametrize("lr", [None, 0.5], ids=["fedsgd", "fedavg"])
def test_batchnorm_clients_train_on_their_own_batch_statistics(lr: float | None) -> None:
    model, params, buffers = _bn_setup()
    batches = _batches()
    update, trained = stateful_update(model.train(), build_policy({}).loss, params, buffers, batches, lr)
    for client in range(len(SIZES)):
        expected_update, expected_buffers = _one_client(model, batches, client, lr)
        for name, value in expected_update.items():
            _close(update[name][client], value, terms=200)
        for name, value in expected_buffers.items():
            if value.is_floating_point():
                _close(trained[name][client], value, terms=200)
            else:
                assert torch.equal(trained[name][client], value), (client, name)
    counted = [1, 1, 1, 0] if lr is None else [3, 3, 1, 1]  # single-sample steps are skipped
    assert trained["1.num_batches_tracked"].tolist() == counted


def test_buffers_aggregate_as_a_weighted_mean_and_a_maximum() -> None:
    _, params, buffers = _bn_setup()
    stacked = {
        "1.running_mean": torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, 6.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]]),
        "1.num_batches_tracked": torch.tensor([4, 7, 9]),
    }
    weights = torch.tensor([1.0, 3.0, 5.0])
    accept = torch.tensor([True, True, False])  # a rejected client's buffers count for nothing
    share = buffer_contribution(stacked, weights, accept)
    total = merge_buffers(None, share)
    total = merge_buffers(
        total, {"1.running_mean": torch.tensor([2.0, 2.0, 2.0, 2.0]), "1.num_batches_tracked": torch.tensor(5)}
    )
    mean = mean_buffers(total, 4.0 + 2.0)
    assert torch.equal(mean["1.running_mean"], torch.tensor([1 + 9 + 2, 2 + 18 + 2, 2, 2]) / torch.tensor(6.0))
    assert int(mean["1.num_batches_tracked"]) == 7

    state = {**params, **buffers}
    delta = {name: torch.ones_like(value) for name, value in params.items()}
    payloads = [
        ChunkPayload(
            0,
            "a",
            delta,
            2.0,
            buffers={"1.running_mean": torch.full((4,), 2.0), "1.num_batches_tracked": torch.tensor(3)},
        ),
        ChunkPayload(
            1,
            "a",
            delta,
            6.0,
            buffers={"1.running_mean": torch.full((4,), 18.0), "1.num_batches_tracked": torch.tensor(2)},
        ),
    ]
    total_payload = combine(payloads)
    algorithm = validate(_minimal(algorithm={"name": "fedavg", "local_steps": 1})).algorithm
    new = {**server_step(state, total_payload.mean() or {}, algorithm), **total_payload.mean_buffers()}
    assert new["1.running_mean"].tolist() == [20.0 / 8] * 4
    assert int(new["1.num_batches_tracked"]) == 3
    assert torch.equal(new["4.bias"], params["4.bias"] + (1.0 + 1.0) / 8)  # payloads hold weighted sums
    assert torch.equal(new["5.running_var"], buffers["5.running_var"])  # not aggregated this round: kept


def test_evaluation_runs_in_eval_mode_with_the_given_running_statistics() -> None:
    model, params, buffers = _bn_setup()
    x = torch.rand(6, 1, 8, 8)
    y = torch.zeros(6, dtype=torch.long)
    shifted = {**buffers, "5.running_mean": torch.tensor([100.0, 0.0, 0.0])}
    _, accuracy = evaluate(model.train(), {**params, **shifted}, x, y, batch_size=4)
    assert accuracy == 0.0  # class 0's logit is pushed far down by its running mean (in eval mode only)
    assert model.training
    reference = copy.deepcopy(model).eval()
    reference.load_state_dict({**params, **buffers})
    loss, _ = evaluate(model, {**params, **buffers}, x, y, batch_size=4)
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(reference(x), y))
    assert abs(loss - expected) <= 64 * EPS * max(1.0, abs(expected))


def test_batchnorm_models_never_take_the_fused_dense_path() -> None:
    class Ordered(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.flip(0))

    assert is_dense_stack(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    assert not is_dense_stack(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)))
    assert not is_dense_stack(Ordered(nn.Flatten(), nn.Linear(4, 2)))


def test_dense_attacks_refuse_a_batchnorm_model_in_one_line() -> None:
    from attacks import AttackNotApplicable, build_attack
    from testbed.audit.outcome import attacker_view
    from testbed.runtime.records import ClientUpdate

    model, params, buffers = _bn_setup()
    experiment = validate(_minimal())
    update = ClientUpdate(0, "a", 0, {name: torch.zeros_like(v) for name, v in params.items()}, 4, 4, 1, None)
    view = attacker_view(update, {**params, **buffers}, model, experiment, (1, 8, 8), 3, CrossEntropy())
    assert set(view.global_params) == set(params)  # the buffers are not part of what the attack reads
    with pytest.raises(AttackNotApplicable) as info:
        build_attack("dense-ratio", {}).check(view)
    assert str(info.value).startswith("dense-ratio: ") and "\n" not in str(info.value)


def test_a_batchnorm_chunk_sums_like_its_halves(bn_module: tuple[str, str]) -> None:
    """Two chunks of a BatchNorm model combine to what one chunk of all their clients gives."""
    from testbed.data.partition import partition
    from testbed.runtime.records import ChunkTask
    from testbed.runtime.simulation import SimulationContext, simulate_chunk

    module, folder = bn_module
    experiment = validate(
        {
            "name": "t",
            "rounds": 1,
            "model": {"name": f"{module}:small_bn_net", "path": folder},
            "algorithm": {"name": "fedavg", "lr": 0.05, "local_steps": 2},
            "clients": [{"group": "a", "count": 4, "batch_size": 3}],
        }
    )
    labels = np.arange(40) % 4
    x = np.random.default_rng(0).random((40, 1, 12, 12), dtype=np.float32)
    context = SimulationContext.build(experiment, x, labels, partition(labels, 4, "iid", seed=0), 4)
    state = initial_state(model_for(experiment.model, (1, 12, 12), 4, seed=0))
    clients = np.arange(4)
    _, whole = simulate_chunk(context, state, ChunkTask(0, 0, 0, clients, clients[:0]))
    halves = [
        simulate_chunk(context, state, ChunkTask(i, 0, 0, part, part[:0]))[1]
        for i, part in enumerate((clients[:2], clients[2:]))
    ]
    assert whole.buffers is not None and whole.weight == 40.0
    joined = combine(halves)
    assert joined.buffers is not None and joined.weighted_sum is not None and whole.weighted_sum is not None
    for name, value in whole.buffers.items():
        if value.is_floating_point():
            _close(joined.buffers[name], value, terms=8)
        else:
            assert torch.equal(joined.buffers[name], value) and int(value) == 2
    params, _ = split_state(context.model, state)
    assert set(whole.weighted_sum) == set(params)
    for name, value in whole.weighted_sum.items():
        _close(joined.weighted_sum[name], value, terms=8)


def test_optimisation_attacks_run_on_a_batchnorm_model(bn_module: tuple[str, str]) -> None:
    """The attacks' copy of the model normalises with batch statistics and mutates nothing (vmap over victims)."""
    from attacks import build_attack
    from testbed.audit.attack_worker import attack_model
    from testbed.audit.outcome import attacker_view
    from testbed.runtime.records import ClientUpdate

    module, folder = bn_module
    experiment = validate(_minimal(model={"name": f"{module}:small_bn_net", "path": folder}))
    client = model_for(experiment.model, (1, 8, 8), 3, seed=0)
    params, buffers = split_state(client, initial_state(client))
    value = nn.functional.cross_entropy(client.train()(torch.rand(2, 1, 8, 8)), torch.tensor([0, 2]))
    gradient = dict(zip(params, torch.autograd.grad(value, list(client.parameters())), strict=True))
    model = attack_model(experiment, (1, 8, 8), 3)
    assert not list(model.buffers())
    update = ClientUpdate(0, "a", 0, gradient, 2, 2, 1, None)
    view = attacker_view(update, {**params, **buffers}, model, experiment, (1, 8, 8), 3, CrossEntropy())
    for name in ("dlg", "inverting-gradients"):
        results = build_attack(name, {"iterations": 2}).reconstruct_many([view, view])
        assert [tuple(result.images.shape) for result in results] == [(2, 1, 8, 8)] * 2, name


def test_a_batchnorm_model_under_dp_sgd_is_refused_before_ray(bn_module: tuple[str, str]) -> None:
    module, folder = bn_module
    groups = [
        {"group": "plain", "count": 2, "batch_size": 8},
        {
            "group": "private",
            "count": 2,
            "batch_size": 8,
            "defence": {"dp": {"clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}},
        },
    ]
    experiment = validate(_minimal(model={"name": f"{module}:small_bn_net", "path": folder}, clients=groups))
    with pytest.raises(UserError) as info:
        prepare_data(experiment)
    assert str(info.value).startswith("clients[1].defence.dp: DP-SGD needs per-example gradients, but layer '1'")
