"""Re-creating a client's update from dummy data, differentiably, and the distances to the real one.

``simulated_update`` returns what the client would have sent for dummy inputs and soft targets: the
batch-mean gradient, or the weight delta after unrolling the declared local SGD steps. It takes the
differentiation rule as an argument so the same code runs under plain autograd (one victim) and
under ``torch.func`` transforms (many victims through ``vmap``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from attacks.losses import SoftTargetLoss

Params = dict[str, Tensor]
Differentiate = Callable[[Callable[[Params], Tensor], Params], Params]


def autograd_gradient(function: Callable[[Params], Tensor], params: Params) -> Params:
    """The gradient of ``function`` at ``params`` by ``torch.autograd``, keeping the graph."""
    value = function(params)
    grads = torch.autograd.grad(value, list(params.values()), create_graph=True)
    return dict(zip(params, grads, strict=True))


def func_gradient(function: Callable[[Params], Tensor], params: Params) -> Params:
    """The gradient of ``function`` at ``params`` by ``torch.func.grad`` (composes with vmap)."""
    result: Params = torch.func.grad(function)(params)
    return result


def simulated_update(
    model: nn.Module,
    loss: SoftTargetLoss,
    params: Params,
    images: Tensor,
    targets: Tensor,
    *,
    kind: str,
    local_steps: int,
    lr: float,
    differentiate: Differentiate,
    sizes: Sequence[int] | None = None,
) -> Params:
    """The update a client would send for ``images`` (N, ...) with soft ``targets`` (N, classes).

    ``kind="gradient"``: the mean loss gradient over all N samples. ``kind="delta"``: ``local_steps``
    SGD steps of size ``lr`` on consecutive slices of the samples, ``sizes`` samples each (``step_sizes``;
    default: equal slices); returns after - before.
    """

    def batch_loss(images_part: Tensor, targets_part: Tensor) -> Callable[[Params], Tensor]:
        def value(current: Params) -> Tensor:
            return loss(functional_call(model, current, (images_part,)), targets_part)

        return value

    if kind == "gradient":
        return differentiate(batch_loss(images, targets), params)
    current = params
    start = 0
    per_step = images.shape[0] // local_steps
    for size in sizes if sizes is not None else [per_step] * local_steps:
        part = slice(start, start + size)
        start += size
        grads = differentiate(batch_loss(images[part], targets[part]), current)
        current = {name: current[name] - lr * grads[name] for name in current}
    return {name: current[name] - params[name] for name in params}


def step_sizes(num_samples: int, local_steps: int, batch_size: int, one_pass: bool = False) -> list[int]:
    """How many of ``num_samples`` samples each of ``local_steps`` SGD steps used, as the attacks simulate them.

    Whole batches of ``batch_size`` when they account for every sample (every batch is then full, whatever the
    batching); with ``one_pass`` (the client's group trains one pass of a shuffling loader: ``AttackerView.one_pass``)
    also full batches and a short last one. ValueError otherwise: batches of other sizes (identical-label batching,
    several epochs over data that do not fill whole batches, a step cap, DP-SGD's Poisson batches) cannot be told
    from the update's metadata, and simulating the wrong steps would under-report.
    """
    if local_steps < 1 or num_samples < local_steps:
        raise ValueError(f"{num_samples} samples cannot fill {local_steps} local steps")
    if num_samples == local_steps * batch_size:
        return [batch_size] * local_steps
    if one_pass and (local_steps - 1) * batch_size < num_samples < local_steps * batch_size:
        return [batch_size] * (local_steps - 1) + [num_samples - (local_steps - 1) * batch_size]
    if one_pass:
        raise ValueError(
            f"num_samples {num_samples} over {local_steps} local steps is not one pass of full batches of "
            f"{batch_size} and a last one holding the rest"
        )
    raise ValueError(
        f"num_samples {num_samples} is not local_steps x batch_size ({local_steps} x {batch_size}), and the client's "
        "batches of other sizes cannot be told from the update (only one pass of random batching is simulated with "
        "a short last batch)"
    )


def squared_distance(simulated: Params, target: Params) -> Tensor:
    """Sum over parameters of the squared L2 distance (the DLG objective)."""
    return torch.stack([((simulated[name] - target[name]) ** 2).sum() for name in target]).sum()


def cosine_distance(simulated: Params, target: Params) -> Tensor:
    """1 - cosine similarity of the two updates, all parameters concatenated (Inverting Gradients).

    Computed as half the squared distance of the unit vectors, which keeps its precision when the
    updates are nearly parallel (1 - cos of 1e-7 and below are common on small sigmoid networks).
    """
    simulated_norm = torch.stack([(simulated[name] ** 2).sum() for name in target]).sum().sqrt()
    target_norm = torch.stack([(target[name] ** 2).sum() for name in target]).sum().sqrt()
    simulated_scale = 1 / simulated_norm.clamp_min(1e-30)
    target_scale = 1 / target_norm.clamp_min(1e-30)
    terms = [(simulated[name] * simulated_scale - target[name] * target_scale) ** 2 for name in target]
    return 0.5 * torch.stack([term.sum() for term in terms]).sum()


def total_variation(images: Tensor) -> Tensor:
    """Mean absolute difference between vertically and horizontally adjacent pixels."""
    vertical = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    horizontal = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    return vertical + horizontal


# Many victims through one forward and backward ---------------------------------------------------------------

PER_SAMPLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Flatten,
    nn.Sigmoid,
    nn.Tanh,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Softplus,
    nn.MaxPool2d,
    nn.AvgPool2d,
)
"""Parameter-free layers that act on each sample alone (a lane's samples never mix with another lane's)."""

LaneLayers = dict[nn.Module, dict[str, str]]
"""The dense and convolutional layers of a model, each with its parameter names by role (weight, bias)."""


def lane_layers(model: nn.Module) -> LaneLayers | None:
    """The model's layers for ``lane_gradients``, or None when its update cannot be formed that way.

    Supported: ``nn.Sequential`` containers (nested or not) of ``Linear`` layers, ungrouped zero-padded
    ``Conv2d`` layers and the per-sample layers of ``PER_SAMPLE_MODULES``, each used once, and no
    buffers. Such a network treats every sample on its own and runs each parametrised layer exactly
    once per forward, which is what ``lane_gradients`` relies on. Anything else (batch normalisation,
    dropout, a custom ``forward``, shared layers) is left to ``torch.func.vmap``.
    """
    if any(True for _ in model.buffers()):
        return None
    layers: LaneLayers = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen:
            return None
        seen.add(id(module))
        if type(module) is nn.Sequential:
            continue
        if type(module) in PER_SAMPLE_MODULES:
            continue
        if type(module) is nn.Conv2d:
            if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
                return None
        elif type(module) is not nn.Linear:
            return None
        own = [name for name, _ in module.named_parameters(recurse=False)]
        layers[module] = {role: f"{prefix}.{role}" if prefix else role for role in own}
    return layers


def lane_gradients(
    model: nn.Module,
    layers: LaneLayers,
    loss: SoftTargetLoss,
    params: Params,
    images: Tensor,
    targets: Tensor,
    *,
    create_graph: bool = True,
) -> Tensor:
    """Each lane's mean loss gradient, all parameters flattened in ``params`` order: (L, parameters).

    ``images`` (L, B, ...) and ``targets`` (L, B, classes): lane ``l`` is a client holding its own ``B``
    samples; ``params`` (shared by all lanes) are those of ``model``, whose layers ``lane_layers``
    accepted. One forward and one backward of all L x B samples give every lane's gradient; with
    ``create_graph`` it stays differentiable with respect to ``images`` (for the attack's second
    backward).

    Why this is each lane's own gradient. Every loss of ``attacks.losses`` is the mean of per-sample
    terms, so ``L * loss(all samples)`` is the sum of the L lanes' losses, and a lane's loss depends only
    on its samples. The gradient of that sum with respect to a layer's output ``z = W x + b`` at one
    sample is therefore the sample's own backprop signal ``d`` under its lane's loss. The lane's weight
    gradient is the sum, over its samples and the layer's output positions, of ``d x^T`` (for a
    convolution ``x`` is the unfolded input patch at that position; for a dense layer there is one
    position), and its bias gradient the sum of ``d``. That is one batched matrix product per layer
    over lanes, on the inputs and output gradients of the shared-weight batch: no per-lane copy of the
    network, no grouped convolution.
    """
    lanes, batch = images.shape[:2]
    flat = images.reshape(lanes * batch, *images.shape[2:])
    if not flat.requires_grad:  # the layers' outputs need a graph for their output gradients
        flat = flat.detach().requires_grad_(True)
    records: list[tuple[nn.Module, Tensor, Tensor]] = []

    def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        records.append((module, inputs[0], output))

    handles = [module.register_forward_hook(record) for module in layers]
    try:
        logits = functional_call(model, params, (flat,))
    finally:
        for handle in handles:
            handle.remove()
    if [module for module, _, _ in records] != list(layers):
        raise ValueError("lane_gradients: every dense and convolutional layer must run once, in model order")
    total = loss(logits, targets.reshape(lanes * batch, -1)) * lanes
    signals_of = torch.autograd.grad(total, [output for _, _, output in records], create_graph=create_graph)
    grads: Params = {}
    for (module, inputs, _), signal in zip(records, signals_of, strict=True):
        names = layers[module]
        if isinstance(module, nn.Conv2d):
            if isinstance(module.padding, str):  # refused by lane_layers
                raise ValueError("lane_gradients: padding must be given in pixels")
            patches = torch.nn.functional.unfold(
                inputs, module.kernel_size, module.dilation, module.padding, module.stride
            )  # (L B, C_in k k, P)
            columns = patches.reshape(lanes, batch, patches.shape[1], patches.shape[2])
            signals = signal.reshape(lanes, batch, signal.shape[1], -1)  # (L, B, C_out, P)
        else:  # Linear on (L B, ..., features): every leading position of a sample counts
            columns = inputs.reshape(lanes, batch, -1, inputs.shape[-1]).transpose(2, 3)  # (L, B, in, P)
            signals = signal.reshape(lanes, batch, -1, signal.shape[-1]).transpose(2, 3)  # (L, B, out, P)
        if batch == 1 and columns.shape[3] == 1:  # one position: an outer product per lane
            weight = signals[:, 0, :, 0].unsqueeze(2) * columns[:, 0, :, 0].unsqueeze(1)
        elif batch == 1:
            weight = torch.bmm(signals[:, 0], columns[:, 0].transpose(1, 2))
        else:
            weight = torch.einsum("lbop,lbkp->lok", signals, columns)
        grads[names["weight"]] = weight
        if "bias" in names:
            grads[names["bias"]] = signals.sum(dim=(1, 3))
    return torch.cat([grads[name].reshape(lanes, -1) for name in params], dim=1)


def lane_cosine_distance(simulated: Tensor, target: Tensor) -> Tensor:
    """``cosine_distance`` of every row of two (L, parameters) tensors, in the same cancellation-free form."""
    simulated_scale = 1 / simulated.square().sum(dim=1, keepdim=True).sqrt().clamp_min(1e-30)
    target_scale = 1 / target.square().sum(dim=1, keepdim=True).sqrt().clamp_min(1e-30)
    return 0.5 * (simulated * simulated_scale - target * target_scale).square().sum(dim=1)


def lane_total_variation(images: Tensor) -> Tensor:
    """``total_variation`` of every lane's images (the leading dimension): a tensor of L values."""
    lanes = images.shape[0]
    vertical = (images[..., 1:, :] - images[..., :-1, :]).abs().reshape(lanes, -1).mean(dim=1)
    horizontal = (images[..., :, 1:] - images[..., :, :-1]).abs().reshape(lanes, -1).mean(dim=1)
    return vertical + horizontal
