"""The experiment schema: one YAML file describes data, model, algorithm, client groups and runtime.

The pydantic models below are the single source of truth for what a topology file may contain;
``testbed schema`` prints them as JSON Schema and docs/configuration.md explains each block.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationInfo, field_validator, model_validator

from defenses.import_path import is_import_path, recorded_folder
from testbed.data.datasets import DATASETS
from testbed.data.partition import PARTITIONS


class Strict(BaseModel):
    """Base for every block: unknown keys are errors, so typos never pass silently; no number field takes
    inf or nan (none of them means anything infinite: a missing limit is null)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


MAX_SWEEP_CELLS = 1000
"""The most combinations a sweep may have unless ``--max-sweep-cells`` allows more (each is validated, then run)."""

MAX_SEED = 2**63
"""Seeds are in [0, 2^63): numpy and torch take them as 64-bit integers."""

MAX_RUN_NAME = 250
MAX_EXPERIMENT_NAME = 256
MAX_PARAM_KEY = 250
"""Lengths MLflow's SQL stores keep: run names, experiment names, parameter keys."""

GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
"""A client group name: it becomes part of MLflow parameter and metric keys (clients.<group>.count) and of
``--set clients.<group>.<field>``."""

_MLFLOW_KEY = re.compile(r"[/\w.\- :]*")
"""The characters MLflow accepts in a parameter or metric key."""


def printable_name(value: str, field: str, limit: int) -> str:
    """A name MLflow stores as given: printable characters on one line, at most ``limit`` of them."""
    if any(not char.isprintable() for char in value):
        raise ValueError(f"{field}: {value!r} holds a line break or another control character; use printable text")
    if len(value) > limit:
        raise ValueError(f"{field}: {len(value)} characters, more than the {limit} MLflow keeps")
    return value


def mlflow_key_problem(key: str) -> str | None:
    """Why MLflow would refuse ``key`` as a parameter key, or None (its rules: characters, path form, length)."""
    if not _MLFLOW_KEY.fullmatch(key):
        return "MLflow keys hold only letters, digits, _ - . / : and spaces"
    if posixpath.normpath(key) != key or key.startswith(("..", "/")):
        return "MLflow keys must not read as a different path (no '//', '/./', '..' or a leading '/')"
    if len(key) > MAX_PARAM_KEY:
        return f"longer than the {MAX_PARAM_KEY} characters MLflow keeps"
    return None


class PartitionConfig(Strict):
    """How the training split is divided among all clients of all groups."""

    scheme: str = Field("iid", description=" | ".join(PARTITIONS))
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller: more label skew)")
    shards_per_client: int = Field(2, ge=1, description="label-sorted shards per client (shards)")
    min_samples: int = Field(1, ge=1, description="fewest samples any client may hold")
    key: str | None = Field(
        None,
        description="by-key: the per-sample key array of the data set (default train_keys), e.g. a writer id; "
        "each client gets one key's samples (docs/data.md)",
    )

    @field_validator("scheme")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value not in PARTITIONS:
            raise ValueError(f"unknown partition scheme {value!r}; allowed: {', '.join(PARTITIONS)}")
        return value

    @model_validator(mode="after")
    def _key_for_by_key(self) -> PartitionConfig:
        if self.key is not None and self.scheme != "by-key":
            raise ValueError(f"partition.key: only the by-key scheme reads a key (scheme is {self.scheme!r})")
        return self


class DatasetConfig(Strict):
    """Which data set, where it lives offline, and how it is split."""

    name: str = Field(
        "mnist-5k",
        description=" | ".join(DATASETS) + ", or your own: an import path package.module:callable returning the "
        "train and test splits (docs/data.md)",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of an import-path data set")
    path: str | None = Field(
        None,
        description="folder an import-path data set is imported from (relative: to the topology file); when not "
        "given, the topology file's folder or the working directory holding the module is recorded here on loading",
    )
    root: str | None = Field(None, description="folder of a torchvision data set (mnist, cifar10, ...)")
    download: bool = Field(False, description="let torchvision download into root when missing")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out share when no test split ships")
    max_train: int | None = Field(None, ge=1, description="truncate the training split (fast runs)")
    max_test: int | None = Field(None, ge=1, description="truncate the test split (fast evaluation)")
    synthetic_samples: int = Field(2000, ge=10, description="synthetic: number of samples (train + test)")
    synthetic_shape: list[PositiveInt] = Field(
        default_factory=lambda: [1, 8, 8], min_length=3, max_length=3, description="synthetic: C, H, W"
    )
    partition: PartitionConfig = Field(default_factory=PartitionConfig)

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value not in DATASETS and not is_import_path(value):
            raise ValueError(
                f"unknown dataset {value!r}; allowed: {', '.join(DATASETS)}, or an import path package.module:callable"
            )
        return value

    @model_validator(mode="after")
    def _own_options(self) -> DatasetConfig:
        if not is_import_path(self.name):
            for option in ("params", "path"):
                if getattr(self, option):
                    raise ValueError(f"dataset.{option}: only an import-path dataset.name takes {option}")
        return self


DEFAULT_ACTIVATIONS: dict[str, str] = {"mlp": "relu", "lenet": "sigmoid", "cnn": "relu"}
"""Each model's activation when the topology names none (LeNet: sigmoid, as in the DLG papers)."""

BUILT_IN_MODELS = ("softmax", "mlp", "lenet", "cnn")
"""The models ``model.name`` may name besides an import path (built by ``testbed.runtime.models.build_model``)."""
DEFAULT_HIDDEN = [256]


class ModelConfig(Strict):
    """The architecture every client trains: a built-in one, or your own by import path."""

    name: str = Field(
        "mlp",
        description=" | ".join(BUILT_IN_MODELS) + ", or your own: an import path package.module:callable, called as "
        "callable(num_classes=C, **params), with input_shape=(C, H, W) too when it takes one; it returns a "
        "torch.nn.Module (README: Your own model)",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of an import-path model")
    path: str | None = Field(
        None,
        description="folder an import-path model is imported from (relative: to the topology file); when not "
        "given, the topology file's folder or the working directory holding the module is recorded here on loading",
    )
    hidden: list[int] = Field(default_factory=lambda: list(DEFAULT_HIDDEN), description="hidden widths (mlp)")
    activation: Literal["relu", "sigmoid", "tanh"] | None = Field(
        None, description="hidden activation (mlp, lenet, cnn; default: relu, but sigmoid for lenet as in DLG)"
    )
    init: Literal["default", "dlg"] = Field(
        "default",
        description="initial weights: torch's layer defaults, or dlg (every parameter uniform(-0.5, 0.5), as the "
        "DLG code initialises its LeNet; the sigmoid LeNet needs it to train under plain SGD)",
    )

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, value: list[int]) -> list[int]:
        if any(width < 1 for width in value):
            raise ValueError(f"hidden widths must be >= 1, got {value}")
        return value

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in BUILT_IN_MODELS and not is_import_path(value):
            raise ValueError(
                f"unknown model {value!r}; allowed: {', '.join(BUILT_IN_MODELS)}, or an import path "
                "package.module:callable"
            )
        return value

    @model_validator(mode="after")
    def _own_options(self) -> ModelConfig:
        """Built-in options for built-in models, ``params`` and ``path`` for one's own."""
        if not is_import_path(self.name):
            for option in ("params", "path"):
                if getattr(self, option):
                    raise ValueError(f"model.{option}: only an import-path model.name takes {option}")
            return self
        if self.activation is not None or self.hidden != DEFAULT_HIDDEN:
            option = "activation" if self.activation is not None else "hidden"
            raise ValueError(
                f"model.{option}: applies to the built-in models; give your model's options in model.params"
            )
        reserved = sorted({"num_classes", "input_shape"} & set(self.params))
        if reserved:
            raise ValueError(f"model.params: {' and '.join(reserved)} come from the data set; leave them out")
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_activation(cls, data: Any) -> Any:
        """An unnamed activation becomes the model's default, so the resolved config (and reports) say it."""
        if isinstance(data, dict) and data.get("activation") is None:
            default = DEFAULT_ACTIVATIONS.get(str(data.get("name", "mlp")))
            if default is not None:
                return {**data, "activation": default}
        return data


class AlgorithmConfig(Strict):
    """FedSGD (one gradient per client) or FedAvg (local SGD, the client sends its weight delta)."""

    name: Literal["fedsgd", "fedavg"] = Field("fedsgd", description="federated algorithm")
    lr: float = Field(0.1, gt=0, description="client learning rate (FedSGD: step applied to the mean gradient)")
    server_lr: float = Field(1.0, gt=0, description="server step on the aggregated update")
    local_epochs: int | None = Field(None, ge=1, description="FedAvg: local epochs over the client's data")
    local_steps: int | None = Field(None, ge=1, description="FedAvg: local SGD steps (instead of epochs)")
    max_update_norm: float | None = Field(None, gt=0, description="reject client updates above this L2 norm")

    @model_validator(mode="after")
    def _one_local_budget(self) -> AlgorithmConfig:
        if self.local_epochs is not None and self.local_steps is not None:
            raise ValueError("give local_epochs or local_steps, not both")
        if self.name == "fedsgd" and (self.local_epochs is not None or self.local_steps is not None):
            raise ValueError("fedsgd takes no local_epochs/local_steps (use fedavg)")
        return self


class FaultConfig(Strict):
    """Fault injection: a share of a group's clients send an invalid update (for testing validation)."""

    fraction: float = Field(0.0, ge=0, le=1, description="share of sampled clients sending a bad update")
    kind: Literal["nan", "inf", "norm", "shape", "dtype"] = Field(
        "nan", description="nan | inf values, a huge norm (x1e6), a truncated tensor, or float64 values"
    )


class ClientGroupConfig(Strict):
    """A group of clients sharing a batch size, a defence policy and a simulated behaviour."""

    group: str = Field(
        min_length=1,
        max_length=100,
        description="unique group name: letters, digits, _ and - (it is part of MLflow keys and of --set paths)",
    )
    count: int = Field(ge=1, description="number of clients in the group")
    batch_size: int = Field(ge=1, description="samples per local batch")
    defence: dict[str, Any] = Field(
        default_factory=dict,
        description="batching, loss, update transforms, dp; path: the folder its import-path parts are imported "
        "from (relative: to the topology file; recorded on loading as model.path is)",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="probability a sampled client sends nothing")
    straggler_delay_s: float = Field(0.0, ge=0, description="mean simulated delay (exponential)")
    faults: FaultConfig = Field(default_factory=lambda: FaultConfig(), description="fault injection")

    @field_validator("group")
    @classmethod
    def _group_name(cls, value: str) -> str:
        if not GROUP_NAME.fullmatch(value):
            raise ValueError(
                f"group name {value!r}: use letters, digits, _ and - (starting with a letter or digit); the name is "
                "part of MLflow parameter keys and of --set clients.<group>.<field>"
            )
        return value

    @field_validator("defence")
    @classmethod
    def _valid_defence(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Record where import-path parts come from (the topology file's folder: ``folder`` in the
        validation context), then build the policy once, so that a bad part is reported before a run."""
        from defenses import build_policy
        from defenses.policy import record_path

        value = record_path(value, (info.context or {}).get("folder"))
        build_policy(value, field="defence")
        return value


class SamplingConfig(Strict):
    """Which clients take part in a round."""

    clients_per_round: int | None = Field(None, ge=1, description="None: every client, every round")
    round_timeout_s: float | None = Field(None, gt=0, description="simulated deadline; later clients are late")
    min_clients: int = Field(1, ge=1, description="fewest accepted updates for a round to count")


class AuditConfig(Strict):
    """Which updates the curious aggregator attacks."""

    clients_per_round: int = Field(4, ge=1, description="updates attacked per audited round")
    every: int = Field(1, ge=1, description="audit every k-th round")
    groups: list[str] | None = Field(None, description="groups to audit (default: all)")
    backlog: int = Field(2, ge=1, description="audited rounds that may still be in the attack and scoring actors")
    when_busy: Literal["wait", "skip"] = Field(
        "wait",
        description="backlog full at an audited round: wait for the oldest audits (inside the round's time) "
        "or skip this round's audits (rounds keep their pace; coverage then depends on timing)",
    )
    optimisation_per_round: int | None = Field(
        None,
        ge=1,
        description="the cost cap: optimisation attacks (dlg, inverting-gradients) run on at most this many of a "
        "round's audited updates (drawn with the round's seed); the analytic attacks run on all of them. The "
        "updates left out are counted per attack in audit/<attack>/not_applicable. Default: 4 under attack "
        "auto, no cap for named attacks",
    )
    target_half_width: float | None = Field(
        None,
        gt=0,
        lt=0.5,
        description="audit as many of each group's sampled clients as it takes for the 95% confidence sequence of "
        "the group's recovered fraction (per window of rounds) to be this narrow, then none until the next window "
        "(docs/attacks.md: Audits sized by a precision target); clients_per_round is then unused. Default: off, "
        "clients_per_round every audited round",
    )
    window: int = Field(
        5, ge=1, description="with target_half_width: rounds per window; each window's interval starts afresh"
    )
    max_clients_per_round: int = Field(
        16,
        ge=1,
        description="with target_half_width: the cost cap, clients audited in one round (all groups together)",
    )

    @model_validator(mode="after")
    def _target_waits(self) -> AuditConfig:
        if self.target_half_width is not None and self.when_busy == "skip":
            raise ValueError(
                "attack.audit.target_half_width needs when_busy: wait (skipped audits would make the count depend "
                "on timing)"
            )
        return self


AUTO_ATTACK = "auto"
"""``attack.name`` that runs every image attack where it applies (``attacks.auto_attacks``)."""
AUTO_OPTIMISATION_CAP = 4
"""Under ``auto``, optimisation attacks run on at most this many audited updates a round, unless
``attack.audit.optimisation_per_round`` says otherwise."""


class AttackConfig(Strict):
    """The gradient-inversion attack (or portfolio of attacks) the aggregator runs on audited updates."""

    name: str | list[str] = Field(
        "auto",
        description="auto (the default: every image attack, each where it applies), an attack name, your own "
        "attack by import path package.module:Class (docs/attacks.md: Write your own attack), or a list of these "
        "(auto in a list: every image attack plus the others listed): every applicable one runs on each audited "
        "update and each sample's leakage is the best reconstruction over them (the worst case for the client)",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="the attack's parameters; with auto or a list of attacks, a mapping from attack name (or the "
        "import path as written in name) to its parameters",
    )
    path: str | None = Field(
        None,
        description="folder import-path attacks are imported from (relative: to the topology file); when not "
        "given, the topology file's folder or the working directory holding the module is recorded here on loading",
    )
    aggregator: str | list[str] = Field("root", description="which aggregator(s) run it: root and/or edge names")

    @property
    def written(self) -> list[str]:
        """``name`` as a list, as the topology writes it (auto, registry names, import paths)."""
        return [self.name] if isinstance(self.name, str) else list(self.name)

    @property
    def is_portfolio(self) -> bool:
        """Whether several attacks run (``auto`` or a list): ``params`` then maps attack names to parameters."""
        return isinstance(self.name, list) or self.name == AUTO_ATTACK

    @property
    def optimisation_cap(self) -> int | None:
        """Most audited updates per round the optimisation attacks run on (None: every one)."""
        if self.audit.optimisation_per_round is not None:
            return self.audit.optimisation_per_round
        return AUTO_OPTIMISATION_CAP if AUTO_ATTACK in self.written else None

    @property
    def names(self) -> list[str]:
        """The registry names of the attacks that run, in the configured order; ``auto`` stands for every image
        attack of the registry, and an import path for its class (imported from ``path`` and registered)."""
        from attacks import attack_name, auto_attacks

        own = {entry: attack_name(entry, self.path) for entry in self.written if entry != AUTO_ATTACK}
        found: list[str] = []
        for entry in self.written:
            for name in auto_attacks() if entry == AUTO_ATTACK else [own[entry]]:
                if name not in found:
                    found.append(name)
        return found

    def params_of(self, name: str) -> dict[str, Any]:
        """The parameters of attack ``name`` (a registry name; its defaults where none are given)."""
        if not self.is_portfolio:
            return dict(self.params)
        from attacks import attack_name

        for key, given in self.params.items():
            if key == name or (key in self.written and key != AUTO_ATTACK and attack_name(key, self.path) == name):
                return dict(given or {})
        return {}

    @property
    def label(self) -> str:
        """The attack, or the portfolio, in a few words (for descriptions and progress)."""
        if not self.is_portfolio:
            return self.names[0]
        prefix = "auto: " if AUTO_ATTACK in self.written else ""
        return prefix + "worst case of " + ", ".join(self.names)

    @property
    def positions(self) -> list[str]:
        """The aggregators that run the attack."""
        return [self.aggregator] if isinstance(self.aggregator, str) else list(self.aggregator)

    labels_known: bool = Field(False, description="threat model: labels are public")
    audit: AuditConfig = Field(default_factory=AuditConfig)

    @model_validator(mode="before")
    @classmethod
    def _record_path(cls, data: Any, info: ValidationInfo) -> Any:
        """Record where import-path attacks come from, as ``model.path`` is (the topology file's folder:
        ``folder`` in the validation context), so that the attack actors import them from there."""
        if not isinstance(data, dict):
            return data
        written = data.get("name", AUTO_ATTACK)
        entries = [written] if isinstance(written, str) else written if isinstance(written, list) else []
        paths = [entry for entry in entries if isinstance(entry, str) and is_import_path(entry)]
        given = data.get("path")
        if not paths or (given is not None and not isinstance(given, str)):
            return data
        folder = recorded_folder(paths, given, (info.context or {}).get("folder"))
        return data if folder is None else {**data, "path": folder}

    @model_validator(mode="after")
    def _known_attack(self) -> AttackConfig:
        from attacks import build_attack

        if isinstance(self.name, list):
            if not self.name:
                raise ValueError("attack.name: give an attack or a non-empty list of attacks")
            repeated = sorted({name for name in self.name if self.name.count(name) > 1})
            if repeated:
                raise ValueError(f"attack.name: {', '.join(repeated)} listed more than once")
            from attacks import auto_attacks

            twice = [name for name in self.name if AUTO_ATTACK in self.name and name in auto_attacks()]
            if twice:
                raise ValueError(f"attack.name: auto runs {', '.join(twice)} already; list it once")
        if self.path is not None and not any(is_import_path(entry) for entry in self.written):
            raise ValueError("attack.path: only an import-path attack.name takes path")
        names = self.names
        if self.is_portfolio:
            stray = sorted(set(self.params) - set(names) - set(self.written))
            if stray:
                raise ValueError(
                    f"attack.params: {', '.join(stray)} is not in attack.name; with auto or a list of attacks, params "
                    f"maps each attack to its parameters (attacks: {', '.join(names)})"
                )
            for key, given in self.params.items():
                if given is not None and not isinstance(given, dict):
                    raise ValueError(f"attack.params.{key}: expected a mapping of parameters, got {given!r}")
        for name in names:
            build_attack(name, self.params_of(name))
        return self


class EdgeConfig(Strict):
    """An edge aggregator: it combines the updates of its client groups and forwards one aggregate to the root."""

    name: str = Field(min_length=1, description="edge name (not 'root')")
    groups: list[str] = Field(min_length=1, description="client groups this edge serves")


class ActorResources(Strict):
    """Ray resources of one actor."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs per actor (also its torch threads)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; fractions share a GPU")


class AttackResources(ActorResources):
    """Ray resources of the attack actors that run audits beside the aggregator."""

    workers: int = Field(1, ge=1, description="attack actors (audits are spread over them)")
    scorers: int = Field(
        2,
        ge=1,
        description="scoring actors matching reconstructions with the training data (audit tasks take turns)",
    )
    nice: int = Field(
        19,
        ge=0,
        le=19,
        description="CPU priority drop of the attack and scoring actors: audits yield the CPU to client workers",
    )


class ResourcesConfig(Strict):
    """Where the run executes and how big the worker pool is."""

    address: str | None = Field(None, description="null: start a local Ray; auto or host:port: join a cluster")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray started for the run")
    workers: int | None = Field(None, ge=1, description="client workers (default: what the CPUs allow)")
    client: ActorResources = Field(default_factory=ActorResources)
    aggregator: ActorResources = Field(default_factory=lambda: ActorResources(num_cpus=0))
    attack: AttackResources = Field(default_factory=AttackResources)
    chunk_size: int = Field(64, ge=1, description="clients simulated together in one task")


class TrackingConfig(Strict):
    """Where MLflow stores the run."""

    uri: str = Field("sqlite:///mlruns.db", description="MLflow tracking URI")
    experiment: str | None = Field(
        None,
        min_length=1,
        description="MLflow experiment (default: the topology name); printable, at most 256 characters",
    )
    artifact_location: str = Field("mlartifacts", description="artifact folder for new experiments")
    checkpoints: str = Field("checkpoints", description="folder of per-run checkpoints (for --resume)")
    outage_s: float = Field(300.0, gt=0, description="stop (after a checkpoint) if MLflow is down this long")

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, value: str | None) -> str | None:
        return None if value is None else printable_name(value, "experiment", MAX_EXPERIMENT_NAME)


class EvaluationConfig(Strict):
    """Server-side evaluation on the held-out split."""

    every: int = Field(1, ge=1, description="evaluate every k-th round (and after the last)")
    batch_size: int = Field(1000, ge=1, description="evaluation batch size")


class Experiment(Strict):
    """A whole experiment: the root of a topology YAML file."""

    name: str = Field(
        min_length=1, description="experiment name (MLflow run name): printable, on one line, at most 250 characters"
    )
    seed: int = Field(
        0, ge=0, lt=MAX_SEED, description="seeds data split, partition, model init and every client; 0 <= seed < 2^63"
    )
    rounds: int = Field(ge=1, description="communication rounds")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    clients: list[ClientGroupConfig] = Field(min_length=1, description="client groups (at least one)")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    attack: AttackConfig | None = Field(None, description="gradient-inversion audit (null: none)")
    aggregators: list[EdgeConfig] = Field(
        default_factory=list, description="edge aggregators between the groups and the root (empty: flat)"
    )
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    sweep: dict[str, list[Any]] | list[dict[str, Any]] | None = Field(
        None,
        description="grid {field.path: [values]} ('a,b' keys change together) or a list of combinations; "
        f"each a child run; at most {MAX_SWEEP_CELLS:,} combinations unless --max-sweep-cells N allows more",
    )

    @field_validator("name")
    @classmethod
    def _run_name(cls, value: str) -> str:
        return printable_name(value, "name", MAX_RUN_NAME)

    @model_validator(mode="after")
    def _mlflow_keys(self) -> Experiment:
        """Every parameter key the run will log is one MLflow accepts (user parameters become keys too)."""
        from testbed.config.flat import flatten

        for key in flatten(self.model_dump(mode="json", exclude={"sweep"})):
            problem = mlflow_key_problem(key)
            if problem is not None:
                parts = key.split(".")
                field = ".".join(parts[:2]) if len(parts) > 2 else key
                raise ValueError(f"{field}: MLflow would refuse the parameter key {key!r}: {problem}")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> Experiment:
        names = [group.group for group in self.clients]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"clients: duplicate group names {duplicates}")
        total = self.total_clients
        per_round = self.sampling.clients_per_round
        if per_round is not None and per_round > total:
            raise ValueError(f"sampling.clients_per_round: {per_round} exceeds the {total} clients configured")
        if self.sampling.min_clients > (per_round or total):
            raise ValueError(
                f"sampling.min_clients: {self.sampling.min_clients} exceeds the {per_round or total} "
                "clients sampled per round"
            )
        self._check_tree(names)
        if self.attack is not None and self.attack.audit.groups is not None:
            unknown = sorted(set(self.attack.audit.groups) - set(names))
            if unknown:
                raise ValueError(f"attack.audit.groups: unknown groups {unknown}; known: {names}")
        return self

    def _check_tree(self, names: list[str]) -> None:
        edges = [edge.name for edge in self.aggregators]
        if "root" in edges or len(set(edges)) != len(edges):
            raise ValueError(f"aggregators: edge names must be unique and not 'root', got {edges}")
        if self.aggregators:
            served = [group for edge in self.aggregators for group in edge.groups]
            unknown = sorted(set(served) - set(names))
            if unknown:
                raise ValueError(f"aggregators: unknown groups {unknown}; known: {names}")
            twice = sorted({group for group in served if served.count(group) > 1})
            missing = sorted(set(names) - set(served))
            if twice or missing:
                raise ValueError(
                    f"aggregators: every group needs exactly one edge (served twice: {twice}, unserved: {missing})"
                )
        if self.attack is not None:
            wrong = sorted(set(self.attack.positions) - {"root", *edges})
            if wrong:
                raise ValueError(f"attack.aggregator: unknown aggregators {wrong}; known: root, {', '.join(edges)}")

    @property
    def total_clients(self) -> int:
        """Clients over all groups."""
        return sum(group.count for group in self.clients)

    @property
    def experiment_name(self) -> str:
        """The MLflow experiment the run is logged under."""
        return self.tracking.experiment or self.name
