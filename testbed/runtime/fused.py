"""FedSGD and FedAvg for dense networks without materialising per-client parameters or gradients.

For a dense layer z = W a + b, a client's update is a sum of outer products: its gradient (FedSGD) is
G = sum_r g_r a_r^T over the rows r of its batch, and its weight delta after local SGD steps (FedAvg)
is -lr times the same sum over the rows of all its steps, where g_r is the error signal of the row's
per-client mean loss and a_r the layer's input. So a chunk of clients needs only the signals and
inputs of every row:

- the chunk's weighted sum sum_c w_c G_c is one matrix product over all rows;
- a client's norm follows from Gram matrices: ||G_c||^2 = sum_{r,r'} (g_r . g_r') (a_r . a_r');
- at local step k a client's weights are W - lr sum_{j<k} g_j a_j^T, so its layer output is
  a W^T + b - lr (a A_<k^T + 1) G_<k: the shared product plus a low-rank correction from the
  client's earlier rows, never a per-client weight matrix;
- an audited client's raw update is one small batched product of its own rows.

Valid when the model is dense layers and parameter-free elementwise activations, and when nothing
needs each client's full update (no update transforms, no injected faults); ``is_dense_stack`` checks the
model and ``low_rank_cheaper`` weighs the low-rank corrections against per-client weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from defenses import Loss
from testbed.runtime.local_update import StackedBatches
from testbed.runtime.low_rank import Factors, thin_factors
from testbed.runtime.records import Params

ACTIVATIONS = (nn.ReLU, nn.Sigmoid, nn.Tanh)
LAYERS = (nn.Linear, nn.Flatten, *ACTIVATIONS)


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if isinstance(model, nn.Sequential):
        return list(model.named_children())
    return [("", model)]


def is_dense_stack(model: nn.Module) -> bool:
    """Whether every layer of ``model`` is dense or a parameter-free elementwise map, applied in order.

    A model with buffers (BatchNorm statistics) is not, nor a subclass of ``nn.Sequential`` that may
    override its forward pass.
    """
    if next(model.buffers(), None) is not None:
        return False
    if isinstance(model, nn.Sequential) and type(model).forward is not nn.Sequential.forward:
        return False
    return all(isinstance(layer, LAYERS) for _, layer in _layers(model))


def low_rank_cheaper(model: nn.Module, rows: int) -> bool:
    """Whether ``rows`` samples per client (all local steps) are cheaper as low-rank corrections.

    A correction costs about rows x (in + out) per layer and sample, a per-client weight matrix in x out.
    """
    dense = [layer for _, layer in _layers(model) if isinstance(layer, nn.Linear)]
    return rows * sum(layer.in_features + layer.out_features for layer in dense) <= sum(
        layer.in_features * layer.out_features for layer in dense
    )


@dataclass
class DenseRows:
    """One dense layer's inputs and output error signals, step by step, for every client."""

    weight_key: str
    bias_key: str | None
    inputs: list[Tensor]  # per local step: (C, B, in)
    signals: list[Tensor]  # per local step: (C, B, out)


@dataclass
class FusedTrace:
    """What a chunk's local computation leaves: per dense layer, the rows that make every update."""

    layers: list[DenseRows]
    scale: float  # 1 for gradients, -lr for weight deltas

    def weighted_sum(self, weights: Tensor) -> Params:
        """sum_c weights[c] * update_c: one matrix product per layer and step."""
        total: Params = {}
        for layer in self.layers:
            factor = (self.scale * weights.to(layer.signals[0].dtype))[:, None, None]
            flat = [(g * factor).reshape(-1, g.shape[-1]) for g in layer.signals]
            total[layer.weight_key] = _total(
                g.T @ a.reshape(-1, a.shape[-1]) for g, a in zip(flat, layer.inputs, strict=True)
            )
            if layer.bias_key is not None:
                total[layer.bias_key] = _total(g.sum(dim=0) for g in flat)
        return total

    def norms(self) -> Tensor:
        """Each client's global L2 norm of its update, from Gram matrices of its rows."""
        first = self.layers[0].inputs[0]
        squares = torch.zeros(first.shape[0], dtype=first.dtype, device=first.device)
        for layer in self.layers:
            for a, g in zip(layer.inputs, layer.signals, strict=True):
                for b, h in zip(layer.inputs, layer.signals, strict=True):
                    squares += (torch.bmm(a, b.transpose(1, 2)) * torch.bmm(g, h.transpose(1, 2))).sum(dim=(1, 2))
            if layer.bias_key is not None:
                squares += _total(g.sum(dim=1) for g in layer.signals).pow(2).sum(dim=1)
        return squares.clamp_min(0.0).sqrt() * abs(self.scale)

    def per_client(self, rows: Tensor, skip: frozenset[str] = frozenset()) -> Params:
        """The full updates of the clients at positions ``rows``, stacked by client (weights named in ``skip``
        left out: ``factors`` gives them)."""
        update: Params = {}
        for layer in self.layers:
            signals = [g[rows] * self.scale for g in layer.signals]
            if layer.weight_key not in skip:
                update[layer.weight_key] = _total(
                    torch.bmm(g.transpose(1, 2), a[rows]) for g, a in zip(signals, layer.inputs, strict=True)
                )
            if layer.bias_key is not None:
                update[layer.bias_key] = _total(g.sum(dim=1) for g in signals)
        return update

    def samples(self, layer: int = 0) -> int:
        """Rows behind one client's update of a layer (samples per step x steps): a bound on its rank."""
        return sum(a.shape[1] for a in self.layers[layer].inputs)

    def factors(self, rows: Tensor, layer: int = 0) -> list[Factors]:
        """Per client at ``rows``, its update of the weight of ``layers[layer]`` as a thin SVD (``thin_factors``)."""
        dense = self.layers[layer]
        signals = torch.cat([g[rows] * self.scale for g in dense.signals], dim=1)
        inputs = torch.cat([a[rows] for a in dense.inputs], dim=1)
        return thin_factors(signals, inputs)


def _total(terms: Iterable[Tensor]) -> Tensor:
    """The sum of one or more tensors (the first one is not copied when it is the only one)."""
    return functools.reduce(torch.add, terms)


def _joined(steps: list[Tensor]) -> Tensor:
    """The rows of every step so far, client by client (no copy for a single step)."""
    return steps[0] if len(steps) == 1 else torch.cat(steps, dim=1)


def _key(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


DenseOutput = Callable[[str, nn.Linear, Tensor, int], Tensor]
"""(module name, layer, its input (C, B, in), its position among the dense layers) -> its output (C, B, out)."""


def dense_forward(
    layers: list[tuple[str, nn.Module]], x: Tensor, dense_output: DenseOutput
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The forward walk of a Flatten -> Linear -> activation ... stack over every client's batch (C, B, ...).

    Returns the logits (C, B, classes), each dense layer's input rows (detached) and its output (C, B, out),
    from ``dense_output``, each requiring a gradient (the first too, though nothing before it needs one), so
    that ``torch.autograd.grad`` of a loss gives the error signals at the dense layers' outputs.
    """
    clients, width = int(x.shape[0]), int(x.shape[1])
    h = x
    inputs: list[Tensor] = []
    outputs: list[Tensor] = []
    for name, layer in layers:
        if isinstance(layer, nn.Flatten):
            h = h.reshape(clients, width, -1)
        elif isinstance(layer, nn.Linear):
            z = dense_output(name, layer, h, len(outputs))
            if not z.requires_grad:  # the first dense layer: nothing before it needs a gradient
                z.requires_grad_(True)
            inputs.append(h.detach())
            outputs.append(z)
            h = z
        else:
            h = layer(h)
    return h, inputs, outputs


def _local_step(
    layers: list[tuple[str, nn.Module]], loss: Loss, x: Tensor, y: Tensor, w: Tensor, dense_output: DenseOutput
) -> tuple[list[Tensor], list[Tensor]]:
    """One local step of every client: each dense layer's input rows and the error signals at its output.

    The loss is each client's mean over its real (weight-1) samples, summed over clients, so a row's
    signal is exactly its share of its own client's gradient.
    """
    clients, width = int(x.shape[0]), int(x.shape[1])
    h, inputs, outputs = dense_forward(layers, x, dense_output)
    per_sample = loss.per_sample(h.reshape(clients * width, -1), y.reshape(-1))
    total = ((per_sample.reshape(clients, width) * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)).sum()
    return inputs, [grad.detach() for grad in torch.autograd.grad(total, outputs)]


def fused_trace(model: nn.Module, loss: Loss, params: Params, batches: StackedBatches, lr: float | None) -> FusedTrace:
    """Run every client's local steps; ``lr`` None: one FedSGD gradient each, else FedAvg SGD steps."""
    clients, width = batches.clients, int(batches.x.shape[2])
    layers = _layers(model)
    dense = [(name, layer) for name, layer in layers if isinstance(layer, nn.Linear)]
    inputs: list[list[Tensor]] = [[] for _ in dense]
    signals: list[list[Tensor]] = [[] for _ in dense]

    def shared_weights(name: str, layer: nn.Linear, h: Tensor, position: int) -> Tensor:
        weight = params[_key(name, "weight")]
        if layer.bias is None:
            z = torch.matmul(h, weight.T)
        else:
            z = torch.addmm(params[_key(name, "bias")], h.reshape(-1, h.shape[-1]), weight.T)
            z = z.reshape(clients, width, -1)
        if inputs[position] and lr is not None:  # later steps: minus the client's own earlier steps
            overlap = torch.bmm(h, _joined(inputs[position]).transpose(1, 2))
            if layer.bias is not None:
                overlap = overlap + 1.0
            z = z - lr * torch.bmm(overlap, _joined(signals[position]))
        return z

    for step in range(1 if lr is None else batches.steps):
        rows, errors = _local_step(
            layers, loss, batches.x[:, step], batches.y[:, step], batches.w[:, step], shared_weights
        )
        for position, (a, g) in enumerate(zip(rows, errors, strict=True)):
            inputs[position].append(a)
            signals[position].append(g)
    return FusedTrace(
        layers=[
            DenseRows(
                weight_key=_key(name, "weight"),
                bias_key=_key(name, "bias") if layer.bias is not None else None,
                inputs=inputs[position],
                signals=signals[position],
            )
            for position, (name, layer) in enumerate(dense)
        ],
        scale=1.0 if lr is None else -lr,
    )


def dense_deltas(model: nn.Module, loss: Loss, params: Params, batches: StackedBatches, lr: float) -> Params:
    """FedAvg weight deltas of a dense model, with each client's weights held and updated in place.

    For many local steps, where low-rank corrections would cost more than per-client weights: every
    step is one batched product per layer forward, and each client's SGD step lands in its weights
    through one fused ``baddbmm_`` (no per-client gradient is written out). Same result as
    ``stacked_deltas`` to float tolerance.
    """
    clients = batches.clients
    layers = _layers(model)
    dense = [(name, layer) for name, layer in layers if isinstance(layer, nn.Linear)]
    local = {key: value.unsqueeze(0).repeat(clients, *[1] * value.dim()) for key, value in params.items()}

    def own_weights(name: str, layer: nn.Linear, h: Tensor, position: int) -> Tensor:
        weight = local[_key(name, "weight")].transpose(1, 2)
        if layer.bias is None:
            return torch.bmm(h, weight)
        return torch.baddbmm(local[_key(name, "bias")].unsqueeze(1), h, weight)

    for step in range(batches.steps):
        rows, errors = _local_step(
            layers, loss, batches.x[:, step], batches.y[:, step], batches.w[:, step], own_weights
        )
        with torch.no_grad():
            for (name, layer), a, g in zip(dense, rows, errors, strict=True):
                local[_key(name, "weight")].baddbmm_(g.transpose(1, 2), a, alpha=-lr)
                if layer.bias is not None:
                    local[_key(name, "bias")].sub_(g.sum(dim=1), alpha=lr)
    for key, value in local.items():
        value.sub_(params[key].unsqueeze(0))
    return local
