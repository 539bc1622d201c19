"""The optimisation attacks on the sigmoid LeNet of DLG with real MNIST digits (fixed seeds, small budgets).

Also their reference defaults and the early stop on an objective plateau (``attacks.early_stop``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

import metrics
from attacks import (
    ATTACKS,
    AttackerView,
    AttackNotApplicable,
    DeepLeakage,
    InvertingGradients,
    build_attack,
    inverting_gradients,
)
from attacks.early_stop import Plateau
from attacks.inverting_gradients import LaneObjective, PerSampleLanes, VmapLanes
from attacks.simulate import autograd_gradient, simulated_update, step_sizes
from attacks.victim import check_simulable
from testbed.runtime.models import build_model
from tests.support.attacks import make_view, mnist_digits

SHAPE = (1, 28, 28)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Small models run as fast on one thread, and OpenMP threads that spin on a shared, busy machine
    made these tests 15-30 times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lenet() -> torch.nn.Module:
    return build_model("lenet", SHAPE, 10, seed=0)


def _random_image() -> torch.Tensor:
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))


def test_defaults_are_the_reference_budgets() -> None:
    """The values docs/attacks.md cites: inversefed's DEFAULT_CONFIG and the original DLG loop."""
    ig = {name: spec.default for name, spec in ATTACKS["inverting-gradients"].parameters.items()}
    assert (ig["iterations"], ig["lr"], ig["restarts"]) == (4800, 0.1, 1)
    assert inverting_gradients.MILESTONES == (3 / 8, 5 / 8, 7 / 8) and inverting_gradients.DECAY == 0.1
    dlg = {name: spec.default for name, spec in ATTACKS["dlg"].parameters.items()}
    assert (dlg["iterations"], dlg["inner_iterations"], dlg["lr"]) == (300, 20, 1.0)
    assert ig["patience"] > 0 and dlg["patience"] > 0  # the early stop is on by default


@pytest.mark.parametrize("label", [3, 7])
def test_dlg_recovers_one_digit_and_stops_on_the_plateau(lenet: torch.nn.Module, label: int) -> None:
    """At the reference budget (300 x 20 L-BFGS iterations) an easy victim stops long before the end."""
    images, labels = mnist_digits([label])
    result = build_attack("dlg").reconstruct(make_view(lenet, images, labels))
    # Measured with these seeds: SSIM 0.998 (3) and 0.998 (7); the objective stops falling at about 1e-8
    # (float32 round-off) and the early stop ends the run after 16 and 15 of 300 outer steps (121 and 110
    # L-BFGS iterations of 6,000).
    assert metrics.ssim(images[0], result.images[0]) > 0.8
    assert result.labels is not None and result.labels.tolist() == [label]
    assert result.diagnostics["outer_iterations_run"] <= 100
    assert result.diagnostics["iterations_run"] <= 1000 < 300 * 20


def test_dlg_unrolls_a_two_step_delta_with_public_labels(lenet: torch.nn.Module) -> None:
    images, labels = mnist_digits([3, 7])
    view = make_view(lenet, images, labels, kind="delta", local_steps=2, lr=0.01, public_labels=True)
    result = build_attack("dlg", {"iterations": 10}).reconstruct(view)
    # Measured: SSIM 0.998 and 0.996 after 10 outer steps (165 L-BFGS iterations).
    assert metrics.match(images, result.images, metric="ssim").scores["ssim"].min() > 0.8


def test_dlg_trace_reads_one_run_at_several_budgets(lenet: torch.nn.Module) -> None:
    """Each checkpoint of one traced run is what a run with that budget returns (L-BFGS has no schedule)."""
    view = make_view(lenet, *mnist_digits([2]))
    attack = build_attack("dlg", {"iterations": 3, "inner_iterations": 4})
    assert isinstance(attack, DeepLeakage)
    first, last = attack.trace(view, [3, 1])
    short = build_attack("dlg", {"iterations": 1, "inner_iterations": 4}).reconstruct(view)
    assert torch.equal(first.images, short.images) and first.diagnostics["objective"] == short.diagnostics["objective"]
    assert torch.equal(last.images, attack.reconstruct(view).images)
    assert first.diagnostics["outer_iterations_run"] == 1 and last.diagnostics["outer_iterations_run"] == 3
    assert last.diagnostics["objective"] <= first.diagnostics["objective"]
    with pytest.raises(ValueError, match=r"checkpoints must lie in 1\.\.3"):
        attack.trace(view, [4])


def test_inverting_gradients_beats_a_random_image_by_far(lenet: torch.nn.Module) -> None:
    images, labels = mnist_digits([3])
    result = build_attack("inverting-gradients", {"iterations": 100}).reconstruct(make_view(lenet, images, labels))
    recovered = (metrics.ssim(images[0], result.images[0]), metrics.avd(images[0], result.images[0]))
    baseline = (metrics.ssim(images[0], _random_image()), metrics.avd(images[0], _random_image()))
    # Measured: reconstruction SSIM 0.999, AVD 0.009; uniform random image SSIM 0.036, AVD 0.97.
    assert recovered[0] > 0.9 and baseline[0] < 0.1
    assert recovered[1] < 0.1 * baseline[1]
    assert result.labels is not None and result.labels.tolist() == [3]
    assert 0.0 <= float(result.images.min()) and float(result.images.max()) <= 1.0


def test_inverting_gradients_unrolls_local_steps_of_a_fedavg_delta(lenet: torch.nn.Module) -> None:
    images, labels = mnist_digits([3, 7])
    view = make_view(lenet, images, labels, kind="delta", local_steps=2, lr=0.01)
    result = build_attack("inverting-gradients", {"iterations": 200}).reconstruct(view)
    matched = metrics.match(images, result.images, metric="ssim")
    # Measured: SSIM 1.000 and 0.999; the two inferred labels are right.
    assert matched.scores["ssim"].min() > 0.9
    assert result.labels is not None and sorted(result.labels.tolist()) == [3, 7]


def test_a_fedavg_delta_with_a_short_last_batch_is_simulated_as_the_client_trained(lenet: torch.nn.Module) -> None:
    """One pass of a shuffling loader over 5 samples in batches of 2 is 3 steps of 2, 2 and 1 samples: the
    attacks' simulation with the true images reproduces the client's delta (float32 round-off), equal slices
    would not, and a count no such pass gives is not applicable."""
    images, labels = mnist_digits([3, 7, 1, 4, 9])
    view = make_view(lenet, images, labels, kind="delta", local_steps=3, lr=0.05, batch_size=2)
    assert step_sizes(5, 3, 2, one_pass=True) == [2, 2, 1]
    one_hot = torch.nn.functional.one_hot(labels, 10).to(torch.float32)
    simulate = {"kind": "delta", "local_steps": 3, "lr": 0.05, "differentiate": autograd_gradient}
    loss = check_simulable(view, "inverting-gradients")
    params = {name: value.clone().requires_grad_(True) for name, value in view.global_params.items()}
    same = simulated_update(lenet, loss, params, images, one_hot, sizes=[2, 2, 1], **simulate)  # type: ignore[arg-type]
    scale = max(float(value.abs().max()) for value in view.update.values())
    for name, value in view.update.items():
        # a few float32 roundings of the same operations: 1e-5 of the update's largest entry
        assert torch.allclose(same[name].detach(), value, atol=1e-5 * scale), name
    with pytest.raises(ValueError):
        step_sizes(5, 3, 2)  # without one pass of random batching, only whole batches can be simulated
    with pytest.raises(AttackNotApplicable, match="not one pass of full batches of 2"):
        check_simulable(make_view(lenet, images[:4], labels[:4], kind="delta", local_steps=3, batch_size=2), "dlg")
    result = build_attack("inverting-gradients", {"iterations": 200}).reconstruct(
        make_view(lenet, images[:3], labels[:3], kind="delta", local_steps=2, lr=0.01, batch_size=2, public_labels=True)
    )
    # labels public: the short last batch (one digit) and the full one are recovered (measured: SSIM 0.992 to
    # 0.999). With inferred labels the attack does not know which step each label belongs to (docs/attacks.md)
    assert metrics.match(images[:3], result.images, metric="ssim").scores["ssim"].min() > 0.9


def _views(models: list[torch.nn.Module]) -> list[AttackerView]:
    return [make_view(model, *mnist_digits([label])) for model, label in zip(models, [1, 3, 7], strict=True)]


# Tolerances between the batched (per-sample or vmap) and per-victim (autograd) paths, from float32 round-off. The
# objective is f = 1/2 |u - v|^2 + tv_weight * TV, u and v the unit-normalised simulated and real updates.
# The two paths compute u with other kernels and summation orders; UNIT_ROUND_OFF bounds the norm of the
# difference of their u: 1e-6 is 8 float32 ulps of 1.0 (2^-23 = 1.2e-7 each), 25 times the largest
# difference measured (about 4e-8, with 1 and 2 threads). By the triangle inequality |u - v| then moves by
# at most UNIT_ROUND_OFF, so f moves by at most UNIT_ROUND_OFF * (sqrt(2 f) + UNIT_ROUND_OFF); the
# relative round-off of the TV term adds UNIT_ROUND_OFF * f at most (see _objective_tolerance).
UNIT_ROUND_OFF = 1e-6
# The gradient of f is a residual: with |u - v| = sqrt(2 f) ~ 3e-3 here, round-off in u of ~1e-7 becomes
# ~4e-5 of the gradient's norm; measured up to 1.3e-5, so 1e-3 (norm-wise) leaves a wide margin. An
# objective evaluated against another victim's update or parameters differs by O(1) of the norm.
GRADIENT_RTOL = 1e-3


def _objective_tolerance(objective: float) -> float:
    """How far the two paths' float32 values of one objective may lie apart (see UNIT_ROUND_OFF)."""
    return UNIT_ROUND_OFF * (math.sqrt(2 * objective) + objective + UNIT_ROUND_OFF)


def _per_victim_objective(attack: InvertingGradients, view: AttackerView) -> Callable[[Tensor], tuple[float, Tensor]]:
    """The one-victim path's objective and its gradient at given dummy images, as ``reconstruct`` computes them."""
    setup = attack._setup(view)
    objective = attack._objective(setup, autograd_gradient)
    params = {name: value.clone().requires_grad_(True) for name, value in setup.params.items()}

    def value_and_gradient(images: Tensor) -> tuple[float, Tensor]:
        images = images.detach().clone().requires_grad_(True)
        value = objective(images, setup.one_hot, params, setup.target)
        (gradient,) = torch.autograd.grad(value, images)
        return float(value.detach()), gradient

    return value_and_gradient


LaneCall = tuple[Tensor, Any]  # the lane images a lane objective was called with, and what it returned


class _Recorder(LaneObjective):
    """A lane objective that records every call (images copied at call time) and passes it on."""

    def __init__(self, inner: LaneObjective, calls: list[LaneCall]) -> None:
        self.inner, self.calls = inner, calls

    def value_and_gradient(self, images: Tensor, lanes: Tensor | None) -> tuple[Tensor, Tensor]:
        output = self.inner.value_and_gradient(images, lanes)
        self.calls.append((images.detach().clone(), output))
        return output

    def values(self, images: Tensor) -> Tensor:
        output = self.inner.values(images)
        self.calls.append((images.detach().clone(), output))
        return output


def _record_lanes(monkeypatch: pytest.MonkeyPatch, calls: list[LaneCall], kinds: list[type] | None = None) -> None:
    """Make every batched run of inverting-gradients record the calls of its lane objective."""
    original = InvertingGradients._lane_objective

    def recording(self: InvertingGradients, setups: Any) -> LaneObjective:
        objective = original(self, setups)
        if kinds is not None:
            kinds.append(type(objective))
        return _Recorder(objective, calls)

    monkeypatch.setattr(InvertingGradients, "_lane_objective", recording)


@pytest.mark.parametrize("formulation", ["auto", "vmap"])
@pytest.mark.parametrize("shared_params", [True, False])
def test_batched_inversion_computes_the_per_victim_objective(
    lenet: torch.nn.Module, shared_params: bool, formulation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every lane of the batched path optimises its own victim's objective and reports it for the image it returns.

    The images themselves are not compared: a signed step turns round-off in a near-zero gradient entry
    into a whole step, so the two paths' trajectories part on some CPUs and thread counts (docs/attacks.md).
    What is compared holds on any machine: the objective and its (unsigned) gradient at the initial dummies
    of every lane, and the per-victim objective at the images the batched path returns. ``auto`` takes the
    per-sample formulation when the victims share their parameters, else vmap.
    """
    models = [lenet] * 3 if shared_params else [build_model("lenet", SHAPE, 10, seed=s) for s in range(3)]
    views = _views(models)
    iterations, restarts = 6, 2
    attack = build_attack("inverting-gradients", {"iterations": iterations, "restarts": restarts, "seed": 5})
    assert isinstance(attack, InvertingGradients)
    attack.formulation = formulation
    one_by_one = [attack.reconstruct(view) for view in views]
    calls: list[LaneCall] = []
    kinds: list[type] = []
    _record_lanes(monkeypatch, calls, kinds)
    batched = attack.reconstruct_many(views)
    assert kinds == [PerSampleLanes if shared_params and formulation == "auto" else VmapLanes]
    # one gradient per Adam step, the first at the initial dummies; then the objectives of the final images
    assert len(calls) == iterations + 1
    (start, (values, gradients)), (final, finals) = calls[0], calls[-1]
    assert start.shape == final.shape == (len(views) * restarts, 1, *SHAPE)
    for index, (view, single, many) in enumerate(zip(views, one_by_one, batched, strict=True)):
        per_victim = _per_victim_objective(attack, view)
        lanes = list(range(index * restarts, (index + 1) * restarts))
        for lane, initial in zip(lanes, attack._initial(view), strict=True):
            assert torch.equal(start[lane], initial)  # the victim's own dummies, in restart order
            value, gradient = per_victim(initial)
            assert abs(float(values[lane]) - value) <= _objective_tolerance(value), (lane, float(values[lane]), value)
            error = float((gradients[lane] - gradient).norm() / gradient.norm())
            assert error <= GRADIENT_RTOL, (lane, error)
            assert float(finals[lane]) < float(values[lane])  # the lane descended its objective
        objectives = [per_victim(final[lane])[0] for lane in lanes]
        best = int(many.diagnostics["best_restart"])
        assert torch.equal(many.images, final[lanes[best]])
        assert many.diagnostics["objective"] == float(finals[lanes[best]])
        reported = many.diagnostics["objective"]
        assert abs(reported - objectives[best]) <= _objective_tolerance(objectives[best]), (reported, objectives)
        # the kept restart is the best one up to round-off (ties within the tolerance may go either way)
        for other in objectives:
            assert objectives[best] <= other + _objective_tolerance(other) + _objective_tolerance(objectives[best])
        assert many.images.shape == single.images.shape == (1, *SHAPE)
        assert many.labels is not None and single.labels is not None
        assert torch.equal(many.labels, single.labels)


def test_batched_inversion_groups_views_that_cannot_share_a_batch(lenet: torch.nn.Module) -> None:
    single = make_view(lenet, *mnist_digits([4]))
    pair = make_view(lenet, *mnist_digits([2, 8]))
    results = build_attack("inverting-gradients", {"iterations": 3}).reconstruct_many([single, pair, single])
    assert [tuple(r.images.shape) for r in results] == [(1, *SHAPE), (2, *SHAPE), (1, *SHAPE)]
    assert torch.equal(results[0].images, results[2].images)
    assert build_attack("inverting-gradients").reconstruct_many([]) == []


def test_optimisation_attacks_leave_the_model_untouched(lenet: torch.nn.Module) -> None:
    before = {name: value.clone() for name, value in lenet.state_dict().items()}
    view = make_view(lenet, *mnist_digits([5]))
    build_attack("dlg", {"iterations": 2}).reconstruct(view)
    build_attack("inverting-gradients", {"iterations": 2}).reconstruct_many([view, view])
    assert all(torch.equal(before[name], value) for name, value in lenet.state_dict().items())
    assert all(not p.requires_grad or p.grad is None for p in lenet.parameters())


def test_attacks_run_inside_no_grad(lenet: torch.nn.Module) -> None:
    view = make_view(lenet, *mnist_digits([5]))
    with torch.no_grad():
        single = build_attack("dlg", {"iterations": 3}).reconstruct(view)
        many = build_attack("inverting-gradients", {"iterations": 3}).reconstruct_many([view, view])
    assert single.images.shape == (1, *SHAPE) and torch.isfinite(single.images).all()
    assert torch.equal(many[0].images, many[1].images) and many[0].diagnostics["objective"] < 1


def _first_plateau(plateau: Plateau, values: list[float], lane: int = 0) -> int | None:
    """The first iteration (1-based) at which ``lane`` plateaus when fed ``values``, checked every iteration."""
    for iteration, value in enumerate(values, start=1):
        plateau.observe(torch.tensor([value]), torch.tensor([lane]))
        if bool(plateau.check(iteration)[lane]):
            return iteration
    return None


def test_plateau_rule_counts_iterations_since_the_last_relative_improvement() -> None:
    halving = [0.5**t for t in range(10)]  # improves by 50 % per iteration until iteration 10
    assert _first_plateau(Plateau(1, 5, 0.01, torch.device("cpu")), halving + [halving[-1]] * 20) == 15
    # 0.2 % per iteration is below min_delta per step, but 1 % accumulates within 6 steps: never a plateau
    assert _first_plateau(Plateau(1, 20, 0.01, torch.device("cpu")), [0.998**t for t in range(200)]) is None
    # a NaN objective never improves; patience 0 turns the rule off
    assert _first_plateau(Plateau(1, 3, 0.01, torch.device("cpu")), [math.nan] * 10) == 3
    assert _first_plateau(Plateau(1, 0, 0.01, torch.device("cpu")), [1.0] * 50) is None


def test_plateau_rule_keeps_lanes_apart_and_restarts_a_window() -> None:
    plateau = Plateau(2, 4, 0.1, torch.device("cpu"))
    for iteration in range(1, 4):
        plateau.observe(torch.tensor([1.0, 2.0**-iteration]))
        assert not plateau.check(iteration).any()
    plateau.observe(torch.tensor([1.0, 2.0**-10]))
    assert plateau.check(4).tolist() == [False, False]
    plateau.observe(torch.tensor([1.0]), torch.tensor([0]))
    assert plateau.check(5).tolist() == [True, False]  # lane 0 last improved at iteration 1
    plateau.restart(torch.tensor([True, False]), 5)
    assert plateau.check(8).tolist() == [False, True] and plateau.check(9).tolist() == [True, True]
    assert plateau.best_values().tolist() == [1.0, 2.0**-10]


def test_inverting_gradients_stops_on_the_plateau(lenet: torch.nn.Module) -> None:
    """With the reference budget of 4,800 steps an easy victim ends in a few hundred (every stage plateaus)."""
    images, labels = mnist_digits([3])
    attack = build_attack("inverting-gradients", {"patience": 50, "check_every": 10})
    result = attack.reconstruct(make_view(lenet, images, labels))
    # Measured: SSIM 1.000 after 330 steps (four stages, each ended by its plateau).
    assert metrics.ssim(images[0], result.images[0]) > 0.9
    assert result.diagnostics["iterations"] == 4800 and result.diagnostics["iterations_run"] <= 1200


def test_batched_lanes_stop_on_their_own(lenet: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lane whose objective cannot move (a zero update: the cosine term is the constant 1/2) stops after
    exactly four patience windows, while the real victim's lane runs on alone.

    Checked every 5 steps with patience 20: the first check (step 5) sets the reference, then each of the
    four stages lasts 20 steps: 5 + 4 * 20 = 85.
    """
    real = make_view(lenet, *mnist_digits([3]), public_labels=True)
    zero = AttackerView(**{**real.__dict__, "update": {name: torch.zeros_like(g) for name, g in real.update.items()}})
    params = {"iterations": 400, "patience": 20, "check_every": 5}
    attack = build_attack("inverting-gradients", params)
    assert isinstance(attack, InvertingGradients)
    calls: list[LaneCall] = []
    _record_lanes(monkeypatch, calls)
    many = attack.reconstruct_many([real, zero])
    assert many[1].diagnostics["iterations_run"] == 85 < many[0].diagnostics["iterations_run"]
    assert attack.reconstruct(zero).diagnostics["iterations_run"] == 85
    lanes = [call[0].shape[0] for call in calls]
    steps = int(many[0].diagnostics["iterations_run"])
    assert lanes == [2] * 85 + [1] * (steps - 85) + [2]  # the frozen lane costs nothing; both are scored
    reported = many[0].diagnostics["objective"]
    recomputed = _per_victim_objective(attack, real)(many[0].images)[0]
    assert abs(reported - recomputed) <= _objective_tolerance(recomputed)
