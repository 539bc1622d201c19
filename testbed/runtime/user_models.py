"""Your own model: ``model: {name: package.module:callable, params: {...}}``.

The callable is called as ``callable(num_classes=C, **params)``, and with ``input_shape=(C, H, W)`` as well
when it names an ``input_shape`` parameter; it must return a ``torch.nn.Module`` mapping a batch of images
to ``C`` logits. ``check_user_model`` tries it before Ray starts: it is built, run in eval mode on a batch of
two blank images, and trained for one vectorised step (``torch.func``) on two clients of two images each;
every failure is one line naming ``model.name``.

Its module reaches the Ray workers through the recorded folder (``model.path``, put on ``sys.path`` where it
exists) and through the job's runtime environment (``runtime_env``): PYTHONPATH for a local Ray, the module's
files (``py_modules``) for a joined cluster. The modules of the data set, of defence parts named by import
path (``defence.path``) and of attacks named by import path (``attack.path``, to the attack actors) travel the
same way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from defenses.import_path import ImportPathError, accepts, call, is_import_path, load_callable, module_location
from defenses.policy import import_paths

if TYPE_CHECKING:
    from testbed.config.schema import Experiment, ModelConfig


class UserModelError(ValueError):
    """An import-path model cannot be built or trained; the message is one line starting with ``model.name``."""


def build_user_model(config: ModelConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Call the model's callable; its result must be a ``torch.nn.Module``."""
    try:
        factory = load_callable(config.name, config.path)
        kwargs: dict[str, Any] = {"num_classes": num_classes, **config.params}
        if accepts(factory, "input_shape"):
            kwargs["input_shape"] = tuple(int(size) for size in input_shape)
        model = call(config.name, factory, kwargs)
    except ImportPathError as exc:
        raise UserModelError(f"model.name: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UserModelError(f"model.name: {config.name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def check_user_model(model: nn.Module, name: str, input_shape: Sequence[int], num_classes: int) -> None:
    """Forward a blank batch in eval mode and train one vectorised step; UserModelError on any problem."""
    from defenses import build_policy
    from testbed.runtime.buffers import check_vectorisable, initial_state, split_state, stateful_update
    from testbed.runtime.local_update import StackedBatches, stacked_gradients

    shape = tuple(int(size) for size in input_shape)
    if not any(parameter.requires_grad for parameter in model.parameters()):
        raise UserModelError(f"model.name: {name} has no trainable parameters")
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.zeros(2, *shape))
    except (Exception, SystemExit, KeyboardInterrupt) as exc:  # sys.exit() in forward is the model's failure
        raise UserModelError(
            f"model.name: {name} fails on a batch of 2 images of shape {shape}: {_first_line(exc)}"
        ) from None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, num_classes):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserModelError(
            f"model.name: {name} gives outputs {got} for a batch of 2 images of shape {shape}; "
            f"expected (2, {num_classes}): one logit per class"
        )
    model.train()
    try:
        check_vectorisable(model)
    except ValueError as exc:
        raise UserModelError(f"model.name: {name}: {exc}") from None
    params, buffers = split_state(model, initial_state(model))
    generator = torch.Generator().manual_seed(0)
    batches = StackedBatches(
        x=torch.rand((2, 1, 2, *shape), generator=generator),
        y=torch.arange(4).reshape(2, 1, 2) % num_classes,
        w=torch.ones(2, 1, 2),
    )
    loss = build_policy({}).loss
    try:
        if buffers:
            stateful_update(model, loss, params, buffers, batches, 0.01)
        else:
            stacked_gradients(model, loss, params, batches)
    except (Exception, SystemExit, KeyboardInterrupt) as exc:
        raise UserModelError(
            f"model.name: {name} cannot be trained vectorised over clients (torch.func): {_first_line(exc)}"
        ) from None


def _code_blocks(experiment: Experiment) -> list[tuple[str, str | None]]:
    """(import path, recorded folder) of every piece of the user's code: model, data set, defence parts,
    attacks."""
    blocks = [(block.name, block.path) for block in (experiment.model, experiment.dataset)]
    if experiment.attack is not None:
        blocks.extend((name, experiment.attack.path) for name in experiment.attack.written)
    blocks = [(name, folder) for name, folder in blocks if is_import_path(name)]
    for group in experiment.clients:
        folder = group.defence.get("path")
        blocks.extend((name, folder if isinstance(folder, str) else None) for name in import_paths(group.defence))
    return blocks


def code_locations(experiment: Experiment) -> list[Path]:
    """The files or folders of the user's own modules (model, data set, defence parts, attacks) that are not
    installed packages."""
    found: list[Path] = []
    for name, folder in _code_blocks(experiment):
        location = module_location(name, folder)
        if location is not None and location not in found:
            found.append(location)
    return found


def code_folders(experiment: Experiment) -> list[str]:
    """The recorded folders of the user's own modules (model.path, dataset.path, each group's defence.path,
    attack.path)."""
    folders: list[str] = []
    for _, folder in _code_blocks(experiment):
        if folder and folder not in folders:
            folders.append(folder)
    return folders


def runtime_env(experiment: Experiment, *, joined: bool) -> dict[str, Any]:
    """What the Ray job's runtime environment adds so that every worker imports the user's modules.

    A local Ray: the recorded folders on the workers' PYTHONPATH (Ray workers do not inherit the driver's
    ``sys.path``). A joined cluster: the modules' files or package folders as ``py_modules``, uploaded to
    every node.
    """
    if joined:
        locations = code_locations(experiment)
        return {"py_modules": [str(location) for location in locations]} if locations else {}
    folders = code_folders(experiment)
    if not folders:
        return {}
    inherited = os.environ.get("PYTHONPATH")
    return {"env_vars": {"PYTHONPATH": os.pathsep.join([*folders, *([inherited] if inherited else [])])}}
