"""Before a run starts: the data set loaded and partitioned, and the global model's initial parameters.

Every problem is a one-line ``UserError`` raised before Ray starts or anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from testbed.config.schema import Experiment
from testbed.data.datasets import Dataset, DatasetUnavailable, load_dataset
from testbed.data.partition import Partition, PartitionError, partition
from testbed.errors import UserError
from testbed.runtime.models import model_for
from testbed.runtime.records import Params
from testbed.runtime.scheduling import group_bounds


@dataclass
class PreparedData:
    """The data set and its partition among all clients."""

    dataset: Dataset
    partition: Partition


def prepare_data(experiment: Experiment) -> PreparedData:
    """Load the data set and partition it; every problem becomes a one-line UserError."""
    spec = experiment.dataset
    try:
        dataset = load_dataset(
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
    except DatasetUnavailable as exc:
        raise UserError(f"dataset.name: {exc}") from None
    try:
        split = partition(
            dataset.train_y,
            experiment.total_clients,
            spec.partition.scheme,
            seed=experiment.seed,
            alpha=spec.partition.alpha,
            shards_per_client=spec.partition.shards_per_client,
            min_samples=spec.partition.min_samples,
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
    return PreparedData(dataset, split)


def initial_params(experiment: Experiment, dataset: Dataset) -> Params:
    """The global model's initial parameters, a function of the seed only."""
    model = model_for(experiment.model, dataset.input_shape, dataset.num_classes, seed=experiment.seed)
    return {name: value.detach().clone() for name, value in model.named_parameters()}
