"""Inverting Gradients (Geiping et al. 2020): cosine matching + total variation, signed Adam, box [0, 1].

``reconstruct`` runs one victim with plain autograd. ``reconstruct_many`` runs every victim and every
restart as one lane of a single computation (one Adam over the stacked dummies), so a GPU stays busy:
per-sample lanes (one forward and backward of all lanes' dummies, ``PerSampleLanes``) where they apply,
else a ``torch.func.vmap`` of the one-victim objective (``VmapLanes``); all compute the same thing.
Each lane keeps its own step-size stage and its own early stop (``attacks.early_stop``), so a lane that
has converged stops costing compute.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from attacks.base import Attack
from attacks.early_stop import Plateau
from attacks.lane_adam import LaneAdam
from attacks.layers import final_dense
from attacks.losses import SoftTargetLoss, loss_key
from attacks.params import Param
from attacks.simulate import (
    Differentiate,
    LaneLayers,
    Params,
    autograd_gradient,
    cosine_distance,
    func_gradient,
    lane_cosine_distance,
    lane_gradients,
    lane_layers,
    lane_total_variation,
    simulated_update,
    total_variation,
)
from attacks.victim import (
    check_simulable,
    global_params,
    initial_images,
    label_targets,
    target_update,
    view_step_sizes,
    working_model,
)
from attacks.view import AttackerView, Reconstruction

INITS = ("uniform", "normal", "constant")
MILESTONES = (3 / 8, 5 / 8, 7 / 8)
"""Fractions of ``iterations`` at which the step size is divided by 10 (the reference implementation's)."""
DECAY = 0.1
"""Adam's moment decay rates and denominator offset (torch's defaults, which the reference code used)."""

LANE_SAMPLES = {"cpu": 64, "cuda": 16384}
"""Default cap on the dummy samples of one batched computation, by device type (others: the CPU's).

On a CPU, lanes beyond a few dozen no longer amortise anything and only leave the caches; on a GPU,
the per-sample formulation holds about 0.5 MB of graph per sample of LeNet/MNIST, so 16,384 samples
take a few GB and leave the kernels large enough to hide the launch overhead."""

LaneStep = Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]]
"""(images of some lanes, which lanes or None for all) -> (their objective values, signs of their gradients)."""


@dataclass(frozen=True)
class _Setup:
    """Everything one lane's objective needs besides the dummy images."""

    view: AttackerView
    model: nn.Module
    loss: SoftTargetLoss
    params: Params
    target: Params
    labels: Tensor
    one_hot: Tensor


class InvertingGradients(Attack):
    """Dummy images optimised to minimise 1 - cos(simulated update, real update) + tv_weight * TV.

    Adam steps on the sign of the gradient, pixels projected to [0, 1] after each step, the step size
    divided by 10 at 3/8, 5/8 and 7/8 of the iterations (the defaults are those of the reference
    implementation: 4,800 iterations, step 0.1, one restart). An objective plateau (no relative
    improvement of ``min_delta`` in the best objective for ``patience`` iterations, checked every
    ``check_every``) ends the current step-size stage early, and ends the run in the last stage. Of
    ``restarts`` runs the lowest final objective wins (a NaN objective counts as +inf). Labels are the
    public ones or inferred. Delta views unroll the declared local SGD steps.

    ``formulation`` chooses how ``reconstruct_many`` forms the lanes' objective: ``"per-sample"``
    (``PerSampleLanes``: one forward and backward of all lanes' dummies), ``"vmap"`` (``VmapLanes``) or
    ``"auto"`` (per-sample where it applies: shared global parameters, a gradient update, a model
    ``lane_layers`` accepts; else vmap). ``lane_samples`` caps the dummy samples of one batched
    computation (victims x restarts x samples per victim); ``None``: ``LANE_SAMPLES`` of the device type.
    """

    name: ClassVar[str] = "inverting-gradients"
    cost: ClassVar[str] = "optimisation"
    formulation: str = "auto"
    lane_samples: int | None = None
    parameters: ClassVar[dict[str, Param]] = {
        "iterations": Param(4800, int, minimum=1, help="most Adam steps per restart"),
        "lr": Param(0.1, float, minimum=0.0, strictly_above=True, help="initial Adam step size"),
        "tv_weight": Param(1e-7, float, minimum=0.0, help="weight of the total-variation prior"),
        "restarts": Param(1, int, minimum=1, help="independent initialisations; the best objective is kept"),
        "seed": Param(0, int, minimum=0, help="seed of the initialisations"),
        "init": Param("uniform", str, choices=INITS, help="dummy image initialisation"),
        "patience": Param(
            200, int, minimum=0, help="steps without a min_delta improvement that end a stage (0: no early stop)"
        ),
        "min_delta": Param(0.01, float, minimum=0.0, maximum=0.5, help="relative improvement that counts"),
        "check_every": Param(25, int, minimum=1, help="steps between two checks of the plateau rule"),
    }

    def check(self, view: AttackerView) -> None:
        """The loss must be one the attack can re-create; inferred labels need a final dense layer."""
        check_simulable(view, self.name)
        if view.labels is None:
            final_dense(view.model, view.num_classes, self.name)

    def _setup(self, view: AttackerView, device: torch.device | None = None, model: nn.Module | None = None) -> _Setup:
        """One victim's setup with its tensors on ``device`` (default: the attack's) and ``model`` (default: a copy)."""
        device = self.device if device is None else device
        loss = check_simulable(view, self.name)
        labels, one_hot = label_targets(view, self.name)
        return _Setup(
            view=view,
            model=working_model(view, self.device) if model is None else model,
            loss=loss,
            params=global_params(view, device),
            target=target_update(view, device),
            labels=labels,
            one_hot=one_hot.to(device),
        )

    def _initial(self, view: AttackerView) -> list[Tensor]:
        """The dummy batch of every restart, drawn in order from one generator seeded with ``seed``."""
        generator = torch.Generator().manual_seed(self.params["seed"])
        shape = (view.num_samples, *view.input_shape)
        return [initial_images(shape, self.params["init"], generator) for _ in range(self.params["restarts"])]

    def _objective(
        self, setup: _Setup, differentiate: Differentiate
    ) -> Callable[[Tensor, Tensor, Params, Params], Tensor]:
        view = setup.view
        sizes = view_step_sizes(view)

        def objective(images: Tensor, one_hot: Tensor, params: Params, target: Params) -> Tensor:
            simulated = simulated_update(
                setup.model,
                setup.loss,
                params,
                images,
                one_hot,
                kind=view.kind,
                local_steps=view.local_steps,
                lr=view.lr,
                sizes=sizes,
                differentiate=differentiate,
            )
            return cosine_distance(simulated, target) + self.params["tv_weight"] * total_variation(images)

        return objective

    def _optimise(self, images: Tensor, value_and_sign: LaneStep) -> Tensor:
        """Signed Adam on the lanes of ``images`` (lanes first), in place; returns the steps each lane ran.

        ``value_and_sign(images, lanes)`` gives the objective values and the sign of their gradients
        for the lanes listed in ``lanes`` (``None``: all of them, in order). A lane's step size is
        ``lr * 0.1**stage``; its stage rises at the milestones and, earlier, when the lane plateaus;
        a plateau in the last stage freezes the lane. The loop ends when every lane is frozen.
        """
        iterations = self.params["iterations"]
        lanes = images.shape[0]
        milestones = [int(iterations * fraction) for fraction in MILESTONES]
        plateau = Plateau(lanes, self.params["patience"], self.params["min_delta"], images.device)
        adam = LaneAdam(images)
        stage = torch.zeros(lanes, dtype=torch.long)
        active = torch.ones(lanes, dtype=torch.bool)
        run = torch.full((lanes,), iterations, dtype=torch.long)
        subset: Tensor | None = None
        step_size = self._step_sizes(stage, images.device)
        for step in range(iterations):
            scheduled = sum(step >= milestone for milestone in milestones)
            raised = active & (stage < scheduled)
            if bool(raised.any()):
                stage = torch.where(raised, scheduled, stage)
                plateau.restart(raised, step)
                step_size = self._step_sizes(stage, images.device)
            values, signs = value_and_sign(images if subset is None else images[subset], subset)
            plateau.observe(values, subset)
            adam.step(images, signs, step_size, subset, bounds=(0.0, 1.0))
            done = step + 1
            if done % self.params["check_every"] or done == iterations:
                continue
            flat = plateau.check(done) & active
            if not bool(flat.any()):
                continue
            last = flat & (stage == len(MILESTONES))
            run = torch.where(last, done, run)
            active &= ~last
            stage = torch.where(flat & ~last, stage + 1, stage)
            plateau.restart(flat & ~last, done)
            step_size = self._step_sizes(stage, images.device)
            if not bool(active.any()):
                break
            if bool(last.any()):
                subset = active.nonzero().squeeze(1).to(images.device)
        return run

    def _step_sizes(self, stage: Tensor, device: torch.device) -> Tensor:
        """Each lane's Adam step size for its stage, on ``device``."""
        return (self.params["lr"] * DECAY ** stage.to(torch.float64)).to(device=device, dtype=torch.float32)

    def _reconstruct(self, view: AttackerView) -> Reconstruction:
        with _full_float32(self.device):
            return self._reconstruct_one(view)

    def _reconstruct_one(self, view: AttackerView) -> Reconstruction:
        setup = self._setup(view)
        objective = self._objective(setup, autograd_gradient)
        params = {name: value.clone().requires_grad_(True) for name, value in setup.params.items()}

        def value_and_sign(lane_images: Tensor, lanes: Tensor | None) -> tuple[Tensor, Tensor]:
            images = lane_images[0].detach().requires_grad_(True)
            value = objective(images, setup.one_hot, params, setup.target)
            (gradient,) = torch.autograd.grad(value, images)
            return value.detach().reshape(1), gradient.sign().unsqueeze(0)

        finals: list[tuple[float, Tensor, int]] = []
        for start in self._initial(view):
            images = start.to(self.device).unsqueeze(0)
            run = int(self._optimise(images, value_and_sign)[0])
            final = float(objective(images[0], setup.one_hot, params, setup.target).detach())
            finals.append((math.inf if math.isnan(final) else final, images[0], run))
        best = min(range(len(finals)), key=lambda index: finals[index][0])
        return self._result(setup, finals[best][1], finals[best][0], best, finals[best][2])

    def _result(self, setup: _Setup, images: Tensor, objective: float, restart: int, run: int) -> Reconstruction:
        return Reconstruction(
            images=images.to(torch.float32).cpu(),
            labels=setup.labels,
            diagnostics={
                "iterations": float(self.params["iterations"]),
                "iterations_run": float(run),
                "objective": objective,
                "best_restart": float(restart),
            },
        )

    def batch_key(self, view: AttackerView) -> Hashable:
        """Views that share the architecture, update kind, loss, local steps, learning rate and shapes (the
        audit of one client group in one round does) form one batch: all victims and restarts in one batched
        computation, with the same result as ``reconstruct`` per view."""
        architecture = tuple((name, tuple(p.shape)) for name, p in view.model.named_parameters())
        return (
            type(view.model),
            architecture,
            view.kind,
            loss_key(view.loss),
            view.local_steps,
            view.lr,
            view.batch_size,
            view.num_samples,
            view.input_shape,
            view.num_classes,
        )

    def _reconstruct_batch(self, views: Sequence[AttackerView]) -> list[Reconstruction]:
        """Views of one ``batch_key``: their global parameters are shared when equal, else stacked per victim.

        A view alone takes the (faster) one-victim path. More views than ``lane_samples`` allows run as several
        batched computations, one after the other, so memory stays bounded whatever the number of victims.
        """
        if len(views) == 1:
            return [self._reconstruct(views[0])]
        per_view = self.params["restarts"] * views[0].num_samples
        limit = self.lane_samples or LANE_SAMPLES.get(self.device.type, LANE_SAMPLES["cpu"])
        size = max(1, limit // per_view)
        results: list[Reconstruction] = []
        for first in range(0, len(views), size):
            with _full_float32(self.device):
                results += self._batched(views[first : first + size])
        return results

    def _batched(self, views: Sequence[AttackerView]) -> list[Reconstruction]:
        # one model for all victims; their tensors stay on the CPU until stacked (one transfer per kind)
        model = working_model(views[0], self.device)
        setups = [self._setup(view, torch.device("cpu"), model) for view in views]
        restarts = self.params["restarts"]
        lane_images = torch.stack([image for view in views for image in self._initial(view)]).to(self.device)
        objective = self._lane_objective(setups)
        images = lane_images.detach().clone()

        def value_and_sign(lane_images: Tensor, lanes: Tensor | None) -> tuple[Tensor, Tensor]:
            values, gradient = objective.value_and_gradient(lane_images, lanes)
            return values, gradient.sign()

        runs = self._optimise(images, value_and_sign)
        finals = torch.nan_to_num(objective.values(images).detach().cpu(), nan=math.inf)
        images = images.cpu()
        results = []
        for index, setup in enumerate(setups):
            lanes = finals[index * restarts : (index + 1) * restarts]
            best = int(torch.argmin(lanes))
            lane = index * restarts + best
            results.append(self._result(setup, images[lane], float(lanes[best]), best, int(runs[lane])))
        return results

    def _lane_objective(self, setups: Sequence[_Setup]) -> LaneObjective:
        """The lanes' objective in the formulation ``formulation`` asks for (``auto``: per-sample where it applies)."""
        restarts = self.params["restarts"]
        first = setups[0].params
        shared = all(
            s.params[name] is first[name] or torch.equal(s.params[name], first[name]) for s in setups for name in first
        )
        layers = lane_layers(setups[0].model) if shared and setups[0].view.kind == "gradient" else None
        if self.formulation == "per-sample" and layers is None:
            raise ValueError("the per-sample formulation needs shared parameters, a gradient and a supported model")
        if self.formulation not in ("auto", "per-sample", "vmap"):
            raise ValueError(f"formulation must be auto, per-sample or vmap, not {self.formulation!r}")
        if layers is not None and self.formulation != "vmap":
            return PerSampleLanes(setups, restarts, layers, self.params["tv_weight"], self.device)
        return VmapLanes(setups, restarts, shared, self._objective(setups[0], func_gradient), self.device)


class LaneObjective(abc.ABC):
    """The objective of every lane (one restart of one victim) of a batched run, and its gradient."""

    @abc.abstractmethod
    def value_and_gradient(self, images: Tensor, lanes: Tensor | None) -> tuple[Tensor, Tensor]:
        """Objective values and their gradients with respect to ``images``, the dummies of ``lanes``.

        ``lanes`` lists which lanes the rows of ``images`` belong to (``None``: all lanes, in order).
        """

    @abc.abstractmethod
    def values(self, images: Tensor) -> Tensor:
        """Objective values of all lanes at ``images`` (one row per lane, in order)."""


class VmapLanes(LaneObjective):
    """Each lane's one-victim objective mapped over the lanes by ``torch.func.vmap``.

    Works for every model, update kind and loss the one-victim path handles; the convolution weight
    gradients become grouped convolutions with one group per lane, which is what limits it.
    """

    def __init__(
        self,
        setups: Sequence[_Setup],
        restarts: int,
        shared: bool,
        objective: Callable[[Tensor, Tensor, Params, Params], Tensor],
        device: torch.device,
    ) -> None:
        self.one_hot = torch.stack([s.one_hot for s in setups]).to(device).repeat_interleave(restarts, dim=0)
        self.target = {
            name: torch.stack([s.target[name] for s in setups]).to(device).repeat_interleave(restarts, dim=0)
            for name in setups[0].target
        }
        self.shared = shared
        self.params = {name: value.to(device) for name, value in setups[0].params.items()}
        if not shared:
            self.params = {
                name: torch.stack([s.params[name] for s in setups]).to(device).repeat_interleave(restarts, dim=0)
                for name in self.params
            }
        in_dims = (0, 0, None if shared else 0, 0)
        self.step = vmap(grad_and_value(objective), in_dims=in_dims)
        self.value = vmap(objective, in_dims=in_dims)

    def value_and_gradient(self, images: Tensor, lanes: Tensor | None) -> tuple[Tensor, Tensor]:
        """See ``LaneObjective``."""
        if lanes is None:
            gradient, values = self.step(images, self.one_hot, self.params, self.target)
        else:
            params = self.params if self.shared else {name: value[lanes] for name, value in self.params.items()}
            targets = {name: value[lanes] for name, value in self.target.items()}
            gradient, values = self.step(images, self.one_hot[lanes], params, targets)
        return values, gradient

    def values(self, images: Tensor) -> Tensor:
        """See ``LaneObjective``."""
        result: Tensor = self.value(images, self.one_hot, self.params, self.target)
        return result


class PerSampleLanes(LaneObjective):
    """All lanes' simulated gradients from one forward and backward of all their dummies (``lane_gradients``).

    The global parameters are shared, so the forward and the first backward are those of one large
    batch; each lane's weight gradient is one batched product of its layers' inputs and output
    gradients. The cosine distance and the TV prior follow per lane, and the gradient with respect to
    the dummies is one second backward through all of it (the lanes are independent, so the gradient
    of their sum is each lane's own gradient).
    """

    def __init__(
        self, setups: Sequence[_Setup], restarts: int, layers: LaneLayers, tv_weight: float, device: torch.device
    ) -> None:
        self.model = setups[0].model
        self.loss = setups[0].loss
        self.params = {name: value.to(device) for name, value in setups[0].params.items()}
        self.layers = layers
        self.tv_weight = tv_weight
        self.one_hot = torch.stack([s.one_hot for s in setups]).to(device).repeat_interleave(restarts, dim=0)
        target = torch.stack([torch.cat([s.target[name].reshape(-1) for name in self.params]) for s in setups])
        self.target = target.to(device).repeat_interleave(restarts, dim=0)

    def _objective(self, images: Tensor, lanes: Tensor | None, create_graph: bool) -> Tensor:
        one_hot = self.one_hot if lanes is None else self.one_hot[lanes]
        target = self.target if lanes is None else self.target[lanes]
        simulated = lane_gradients(
            self.model, self.layers, self.loss, self.params, images, one_hot, create_graph=create_graph
        )
        return lane_cosine_distance(simulated, target) + self.tv_weight * lane_total_variation(images)

    def value_and_gradient(self, images: Tensor, lanes: Tensor | None) -> tuple[Tensor, Tensor]:
        """See ``LaneObjective``."""
        images = images.detach().requires_grad_(True)
        values = self._objective(images, lanes, create_graph=True)
        (gradient,) = torch.autograd.grad(values.sum(), images)
        return values.detach(), gradient

    def values(self, images: Tensor) -> Tensor:
        """See ``LaneObjective``."""
        return self._objective(images, None, create_graph=False).detach()


@contextlib.contextmanager
def _full_float32(device: torch.device) -> Iterator[None]:
    """Full float32 products on CUDA while the block runs (no TF32), then the previous settings.

    The objective of a good reconstruction is 1 - cos of 1e-8 and below; TF32's 10-bit mantissa in the
    convolutions and products would put a floor of about 1e-6 under it.
    """
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
