"""Before a run starts: the data set loaded and partitioned, and the global model's initial parameters.

Every problem is a one-line ``UserError`` raised before Ray starts or anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from defenses import build_policy
from defenses.import_path import ImportPathError, is_import_path
from testbed.config.schema import Experiment
from testbed.data.datasets import Dataset, DatasetUnavailable, load_dataset
from testbed.data.partition import Partition, PartitionError, partition
from testbed.data.user_data import DEFAULT_KEY, load_user_dataset
from testbed.errors import UserError
from testbed.runtime.buffers import initial_state
from testbed.runtime.dp_update import check_model as check_dp_model
from testbed.runtime.models import model_for
from testbed.runtime.records import Params
from testbed.runtime.scheduling import group_bounds
from testbed.runtime.user_models import UserModelError, check_user_model


@dataclass
class PreparedData:
    """The data set and its partition among all clients."""

    dataset: Dataset
    partition: Partition


def _load(experiment: Experiment) -> Dataset:
    """The data set the experiment names: a built-in one, or the user's own by import path."""
    spec = experiment.dataset
    try:
        if is_import_path(spec.name):
            return load_user_dataset(
                spec.name,
                spec.params,
                folder=spec.path,
                root=spec.root,
                seed=experiment.seed,
                max_train=spec.max_train,
                max_test=spec.max_test,
            )
        return load_dataset(
            spec.name,
            root=spec.root,
            download=spec.download,
            test_fraction=spec.test_fraction,
            seed=experiment.seed,
            max_train=spec.max_train,
            max_test=spec.max_test,
            synthetic_samples=spec.synthetic_samples,
            synthetic_shape=(spec.synthetic_shape[0], spec.synthetic_shape[1], spec.synthetic_shape[2]),
        )
    except (DatasetUnavailable, ImportPathError) as exc:
        raise UserError(f"dataset.name: {exc}") from None


def _keys(experiment: Experiment, dataset: Dataset) -> np.ndarray | None:
    """The per-sample keys the by-key partition groups by (None for the other schemes)."""
    spec = experiment.dataset
    if spec.partition.scheme != "by-key":
        return None
    key = spec.partition.key or DEFAULT_KEY
    if key not in dataset.keys:
        if not dataset.keys:
            raise UserError(
                f"dataset.partition.key: by-key needs a key for every training sample, and data set {spec.name!r} "
                f"gives none (an import-path data set returns them, e.g. as {DEFAULT_KEY}; docs/data.md)"
            )
        raise UserError(
            f"dataset.partition.key: data set {spec.name!r} gives no key {key!r}; it gives "
            f"{', '.join(sorted(dataset.keys))}"
        )
    return dataset.keys[key]


def prepare_data(experiment: Experiment) -> PreparedData:
    """Load the data set, partition it and try an import-path model on it; every problem is a one-line UserError."""
    spec = experiment.dataset
    dataset = _load(experiment)
    try:
        split = partition(
            dataset.train_y,
            experiment.total_clients,
            spec.partition.scheme,
            seed=experiment.seed,
            alpha=spec.partition.alpha,
            shards_per_client=spec.partition.shards_per_client,
            min_samples=spec.partition.min_samples,
            keys=_keys(experiment, dataset),
        )
    except PartitionError as exc:
        raise UserError(f"dataset.{exc}" if str(exc).startswith("partition") else f"dataset.partition: {exc}") from None
    sizes = split.sizes()
    bounds = group_bounds(experiment)
    for g, group in enumerate(experiment.clients):
        median = float(np.median(sizes[bounds[g] : bounds[g + 1]]))
        if group.batch_size > median:
            raise UserError(
                f"clients[{g}].batch_size: {group.batch_size} exceeds the median shard of group "
                f"{group.group!r} ({median:g} samples per client); use a smaller batch or fewer clients"
            )
    if is_import_path(experiment.model.name):
        _check_user_model(experiment, dataset)
    return PreparedData(dataset, split)


def _check_user_model(experiment: Experiment, dataset: Dataset) -> None:
    """Build and try an import-path model; a DP-SGD group also needs per-example gradients from it."""
    try:
        model = model_for(experiment.model, dataset.input_shape, dataset.num_classes, seed=experiment.seed)
        check_user_model(model, experiment.model.name, dataset.input_shape, dataset.num_classes)
    except UserModelError as exc:
        raise UserError(str(exc)) from None
    for g, group in enumerate(experiment.clients):
        if build_policy(group.defence).dp is not None:
            try:
                check_dp_model(model)
            except ValueError as exc:
                raise UserError(f"clients[{g}].{exc}") from None


def initial_params(experiment: Experiment, dataset: Dataset) -> Params:
    """The global model's initial state (parameters, and buffers such as BatchNorm statistics), a function of
    the seed only."""
    return initial_state(model_for(experiment.model, dataset.input_shape, dataset.num_classes, seed=experiment.seed))
