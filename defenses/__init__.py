"""Client-side defence policies: batching strategies, training losses and update transforms.

Pure torch and numpy; build a policy from a YAML ``defence`` block with :func:`build_policy`.
"""

from defenses.batching import (
    BATCHINGS,
    Batching,
    BatchPlan,
    DistinctLabels,
    IdenticalLabels,
    LabelCount,
    RandomBatching,
)
from defenses.dp import DPSGD, build_dp, epsilon, expected_batch_size, poisson_sample, sample_rate
from defenses.errors import DefenceConfigError, ParameterError
from defenses.losses import (
    LOSSES,
    CrossEntropy,
    LabelSmoothing,
    Loss,
    MeanSquaredError,
    SigmoidBinaryCrossEntropy,
)
from defenses.parts import Part
from defenses.policy import DefencePolicy, build_policy
from defenses.registry import Registry, register, registered
from defenses.transforms import (
    TRANSFORMS,
    ClipL2,
    GaussianNoise,
    Prune,
    Quantize,
    UpdateTransform,
    client_norms,
)

__all__ = [
    "BATCHINGS",
    "DPSGD",
    "LOSSES",
    "TRANSFORMS",
    "BatchPlan",
    "Batching",
    "ClipL2",
    "CrossEntropy",
    "DefenceConfigError",
    "DefencePolicy",
    "DistinctLabels",
    "GaussianNoise",
    "IdenticalLabels",
    "LabelCount",
    "LabelSmoothing",
    "Loss",
    "MeanSquaredError",
    "ParameterError",
    "Part",
    "Prune",
    "Quantize",
    "RandomBatching",
    "Registry",
    "SigmoidBinaryCrossEntropy",
    "UpdateTransform",
    "build_dp",
    "build_policy",
    "client_norms",
    "epsilon",
    "expected_batch_size",
    "poisson_sample",
    "register",
    "registered",
    "sample_rate",
]
