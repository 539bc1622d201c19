"""A data set by import path and the by-key partition: the three return forms, keys, and one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from testbed.config.topology import validate
from testbed.errors import UserError
from testbed.runtime.preparation import prepare_data
from tests.support.user_code import write_module

WRITERS = '''
"""A FEMNIST-like data set: every training image comes with the id of the writer who drew it."""

import numpy as np
import torch


def arrays(writers=12, per_writer=10, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    n = writers * per_writer
    labels = rng.integers(0, classes, size=n)
    images = (rng.random((n, 6, 6)) * 255).astype(np.uint8)
    images[:, 0, 0] = labels * 100  # a pixel that tells the class
    return {
        "train_x": images,
        "train_y": labels,
        "test_x": images[:20],
        "test_y": labels[:20],
        "writer": np.repeat([f"w{k:02d}" for k in range(writers)], per_writer),
        "train_keys": np.repeat(np.arange(writers), per_writer),
    }


def as_tuple(root=None):
    data = arrays()
    return data["train_x"] / 255.0, torch.as_tensor(data["train_y"]), data["test_x"] / 255.0, data["test_y"]


class Items(torch.utils.data.Dataset):
    def __init__(self, train):
        data = arrays()
        self.x = torch.as_tensor(data["train_x" if train else "test_x"], dtype=torch.float32)[:, None] / 255
        self.y = data["train_y" if train else "test_y"]
        self.train = train

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.x[i], int(self.y[i]), i // 10) if self.train else (self.x[i], int(self.y[i]))


def datasets():
    return Items(True), Items(False)


def with_classes():
    return {**arrays(), "num_classes": 5}


def wrong_lengths():
    data = arrays()
    return data["train_x"], data["train_y"][:-1], data["test_x"], data["test_y"]


def negative_labels():
    data = arrays()
    return data["train_x"], data["train_y"] - 1, data["test_x"], data["test_y"]


def a_list():
    return [1, 2, 3]


def short_keys():
    return {**arrays(), "train_keys": np.arange(5)}
'''


@pytest.fixture
def module(tmp_path: Path) -> tuple[str, str]:
    return write_module(tmp_path, WRITERS, stem="writers"), str(tmp_path)


def _experiment(module: tuple[str, str], function: str, count: int = 4, **dataset: Any) -> Any:
    name, folder = module
    return validate(
        {
            "name": "t",
            "rounds": 1,
            "dataset": {"name": f"{name}:{function}", "path": folder, **dataset},
            "model": {"name": "softmax"},
            "clients": [{"group": "a", "count": count, "batch_size": 2}],
        }
    )


def test_a_mapping_with_keys_partitions_by_writer(module: tuple[str, str]) -> None:
    prepared = prepare_data(_experiment(module, "arrays", partition={"scheme": "by-key", "key": "writer"}))
    dataset, split = prepared.dataset, prepared.partition
    assert dataset.train_x.shape == (120, 1, 6, 6) and dataset.train_x.dtype == np.float32
    assert float(dataset.train_x.max()) <= 1.0 and dataset.num_classes == 3
    writers = dataset.keys["writer"]
    owned = [np.unique(writers[split.client(c)]) for c in range(4)]
    assert all(len(keys) == 1 for keys in owned) and len({str(keys[0]) for keys in owned}) == 4
    assert split.sizes().tolist() == [10, 10, 10, 10]  # every sample of the chosen writers, the others unused
    default = prepare_data(_experiment(module, "arrays", partition={"scheme": "by-key"}))  # train_keys
    assert all(len(np.unique(default.dataset.keys["train_keys"][default.partition.client(c)])) == 1 for c in range(4))


def test_a_tuple_and_a_pair_of_torch_datasets_give_the_same_images(module: tuple[str, str]) -> None:
    from_mapping = prepare_data(_experiment(module, "arrays")).dataset
    from_tuple = prepare_data(_experiment(module, "as_tuple")).dataset
    from_torch = prepare_data(_experiment(module, "datasets", partition={"scheme": "by-key"}))
    for other in (from_tuple, from_torch.dataset):
        np.testing.assert_allclose(other.train_x, from_mapping.train_x, rtol=0, atol=np.finfo(np.float32).eps)
        assert np.array_equal(other.train_y, from_mapping.train_y) and other.num_classes == 3
    assert np.array_equal(from_torch.dataset.keys["train_keys"], np.arange(120) // 10)  # the items' third entry
    assert prepare_data(_experiment(module, "with_classes")).dataset.num_classes == 5


def test_truncation_keeps_each_key_with_its_sample(module: tuple[str, str]) -> None:
    full = prepare_data(_experiment(module, "arrays")).dataset
    small = prepare_data(_experiment(module, "arrays", max_train=30, max_test=10)).dataset
    assert len(small.train_y) == 30 and len(small.test_y) == 10
    for image, writer in zip(small.train_x, small.keys["train_keys"], strict=True):
        rows = np.flatnonzero((full.train_x == image).all(axis=(1, 2, 3)))
        assert writer in full.keys["train_keys"][rows]


@pytest.mark.parametrize(
    ("function", "changes", "expected"),
    [
        ("a_list", {}, "dataset.name: {m}:a_list: returned a list; expected (train_x, train_y, test_x, test_y)"),
        ("wrong_lengths", {}, "dataset.name: {m}:wrong_lengths: train_x holds 120 images but train_y 119 labels"),
        ("negative_labels", {}, "dataset.name: {m}:negative_labels: train_y holds negative labels"),
        ("short_keys", {}, "dataset.name: {m}:short_keys: key 'train_keys' has 5 values for 120 training samples"),
        ("absent", {}, "dataset.name: '{m}' has no attribute 'absent'"),
        ("arrays", {"params": {"colour": True}}, "dataset.name: {m}:arrays(colour=True) failed: TypeError:"),
        (
            "arrays",
            {"partition": {"scheme": "by-key", "key": "session"}},
            "dataset.partition.key: data set '{m}:arrays' gives no key 'session'; it gives train_keys, writer",
        ),
        (
            "as_tuple",
            {"partition": {"scheme": "by-key"}},
            "dataset.partition.key: by-key needs a key for every training sample, and data set '{m}:as_tuple' "
            "gives none",
        ),
        (
            "arrays",
            {"partition": {"scheme": "by-key"}, "count": 13},
            "dataset.partition: by-key gives each client one key's samples, but there are 12 keys for 13 clients",
        ),
    ],
)
def test_data_problems_are_one_line_user_errors_before_ray(
    module: tuple[str, str], function: str, changes: dict[str, Any], expected: str
) -> None:
    count = changes.pop("count", 4)
    with pytest.raises(UserError) as info:
        prepare_data(_experiment(module, function, count=count, **changes))
    message = str(info.value)
    assert message.startswith(expected.format(m=module[0])), message
    assert "\n" not in message


def test_built_in_data_sets_have_no_keys_to_partition_by() -> None:
    experiment = validate(
        {
            "name": "t",
            "rounds": 1,
            "dataset": {"name": "digits", "partition": {"scheme": "by-key"}},
            "clients": [{"group": "a", "count": 4, "batch_size": 2}],
        }
    )
    with pytest.raises(UserError, match="by-key needs a key for every training sample, and data set 'digits' gives"):
        prepare_data(experiment)
    with pytest.raises(UserError, match=r"partition\.key: only the by-key scheme reads a key"):
        validate({**experiment.model_dump(), "dataset": {"partition": {"scheme": "iid", "key": "writer"}}})
    with pytest.raises(UserError, match=r"dataset\.params: only an import-path dataset\.name takes params"):
        validate({**experiment.model_dump(), "dataset": {"name": "digits", "params": {"a": 1}}})
