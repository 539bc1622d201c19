"""The study file: seeds, training settings, model arms, defence policies, audit stages and budgets.

A study file (``topologies/studies/mixing-study.yaml``) names everything the study varies. Every run it trains
is an ordinary experiment built by ``experiment_for`` and validated by the topology schema, so a study
cannot configure what a topology cannot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from testbed.config.schema import AUTO_ATTACK, Experiment
from testbed.config.topology import format_loc, read_yaml, validate
from testbed.errors import UserError

STAGES = ("initial", "half", "ninety")
STAGE_HELP = "initial: the untrained model; half / ninety: first evaluation at 50% / 90% of the final accuracy"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Setting(_Strict):
    """How clients train: algorithm, partition, population and the training batch size."""

    algorithm: dict[str, Any] = Field(description="algorithm block without lr (lr comes from the arm's grid)")
    partition: dict[str, Any] = Field(description="dataset.partition block")
    clients: int = Field(ge=2)
    clients_per_round: int = Field(ge=1)
    batch_size: int = Field(ge=1, description="training batch size of every client")


class Arm(_Strict):
    """One model under one setting: its training budget, learning-rate grid and attack portfolio."""

    model: dict[str, Any] = Field(description="model block")
    setting: str
    rounds: int = Field(ge=1)
    evaluate_every: int = Field(ge=1)
    lr_grid: list[float] = Field(
        min_length=1, description="tried per loss on every tuning seed; the best worst-seed final accuracy wins"
    )
    attacks: list[str] = Field(
        min_length=1,
        description="the portfolio run on every audited update: attack names, or auto (every image attack where it "
        "applies), alone or beside others",
    )
    attack_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    accuracy_policies: list[str] | None = Field(
        None, description="policies trained on every seed for their accuracy cost (null: all)"
    )
    audit_policies: list[str] | None = Field(None, description="policies audited at each stage (null: all)")
    audit_batch_sizes: list[int] | None = Field(None, description="batch sizes audited (null: audit.batch_sizes)")

    @property
    def attack_names(self) -> list[str]:
        """The registry names of the portfolio, ``auto`` expanded to every image attack (in registry order)."""
        from attacks import auto_attacks

        names: list[str] = []
        for entry in self.attacks:
            for name in auto_attacks() if entry == AUTO_ATTACK else [entry]:
                if name not in names:
                    names.append(name)
        return names

    @property
    def portfolio_label(self) -> str:
        """The portfolio as written, ``auto`` followed by what it stands for: ``auto (dense-ratio, ...)``."""
        if AUTO_ATTACK not in self.attacks:
            return ", ".join(self.attacks)
        return ", ".join(self.attacks) + f" ({', '.join(self.attack_names)})"

    @property
    def label(self) -> str:
        """A short name: model[-activation]/setting."""
        name = str(self.model.get("name"))
        activation = self.model.get("activation")
        return f"{name}-{activation}/{self.setting}" if activation else f"{name}/{self.setting}"


Stage = Literal["initial", "half", "ninety"]


def _all_stages() -> list[Stage]:
    return ["initial", "half", "ninety"]


class AuditPlan(_Strict):
    """What is audited at each stage of each trained baseline."""

    stages: list[Stage] = Field(default_factory=_all_stages)
    batch_sizes: list[int] = Field(min_length=1)
    clients: int = Field(ge=1, description="audited clients per (seed, stage); the same clients for every policy")
    bootstrap: int = Field(2000, ge=100, description="unused: intervals are exact over seeds (kept for old files)")


class BudgetCheck(_Strict):
    """A subset re-audited with larger attack budgets: the same updates, to show the answer does not move."""

    arms: list[int] = Field(min_length=1, description="indices into arms")
    seeds: list[int] = Field(min_length=1)
    stages: list[Stage] = Field(min_length=1)
    attack_params: dict[str, dict[str, Any]] = Field(description="attack -> parameters replacing the arm's")
    policies: list[str] | None = Field(
        None, description="the policies re-attacked, of those each arm audits (null: every audited policy)"
    )


class ClaimRules(_Strict):
    """What the verdicts on the paper's claims take as meaningful and significant."""

    meaningful_effect: float = Field(
        0.1, gt=0, lt=1, description="a leaked fraction (or a difference in it) that matters; verdict threshold"
    )
    accuracy_margin: float = Field(0.02, gt=0, lt=1, description="an accuracy loss that matters (non-inferiority)")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="significance level, Holm-adjusted within each claim")


class StudySpec(_Strict):
    """A whole study; ``experiment_for`` turns one of its runs into a validated Experiment."""

    name: str
    seeds: list[int] = Field(min_length=1)
    tuning_seeds: list[int] = Field(
        min_length=1, description="seeds of the learning-rate search, kept apart from the study seeds"
    )
    dataset: dict[str, Any]
    tracking: dict[str, Any]
    workers: int = Field(2, ge=1, description="Ray tasks run at once (one CPU each)")
    baseline: str = Field(description="the policy whose models are audited (random batching, cross-entropy)")
    policies: dict[str, dict[str, Any]] = Field(description="name -> defence block")
    settings: dict[str, Setting]
    arms: list[Arm] = Field(min_length=1)
    audit: AuditPlan
    budget_check: BudgetCheck | None = None
    claims: ClaimRules = Field(default_factory=ClaimRules)

    @model_validator(mode="after")
    def _names_exist(self) -> StudySpec:
        if self.baseline not in self.policies:
            raise ValueError(f"baseline: {self.baseline!r} is not one of policies ({', '.join(self.policies)})")
        for index, arm in enumerate(self.arms):
            if arm.setting not in self.settings:
                raise ValueError(
                    f"arms[{index}].setting: {arm.setting!r} is not one of settings ({', '.join(self.settings)})"
                )
            for field_name in ("accuracy_policies", "audit_policies"):
                for name in getattr(arm, field_name) or []:
                    if name not in self.policies:
                        raise ValueError(f"arms[{index}].{field_name}: unknown policy {name!r}")
            if arm.audit_policies is not None and self.baseline not in arm.audit_policies:
                raise ValueError(f"arms[{index}].audit_policies: must include the baseline {self.baseline!r}")
        for seed in self.tuning_seeds:
            if seed in self.seeds:
                raise ValueError(f"tuning_seeds: {seed} is one of seeds; tune on seeds the study does not report")
        check = self.budget_check
        if check is not None:
            for index in check.arms:
                if not 0 <= index < len(self.arms):
                    raise ValueError(f"budget_check.arms: {index} is not an arm index (0 to {len(self.arms) - 1})")
            for seed in check.seeds:
                if seed not in self.seeds:
                    raise ValueError(f"budget_check.seeds: {seed} is not one of seeds {self.seeds}")
            for name in check.policies or []:
                if name not in self.policies:
                    raise ValueError(f"budget_check.policies: unknown policy {name!r}")
        return self

    def lr_for(self, lrs: dict[str, float], policy: str) -> float:
        """A policy's learning rate from the rates tuned per loss (a DP-SGD policy's loss, if tuned, else
        cross-entropy's: DP-SGD policies are not tuned on their own)."""
        return lrs.get(self.loss_of(policy)) or lrs.get("cross-entropy") or next(iter(lrs.values()))

    def loss_of(self, policy: str) -> str:
        """The loss a policy trains with (cross-entropy unless its block says otherwise)."""
        return str(self.policies[policy].get("loss", "cross-entropy"))

    def audited_policies(self, arm: Arm, budget_check: bool = False) -> list[str]:
        """The policies audited on ``arm``'s stages (``budget_check``: those the budget check re-attacks)."""
        names = arm.audit_policies if arm.audit_policies is not None else list(self.policies)
        chosen = self.budget_check.policies if budget_check and self.budget_check is not None else None
        return names if chosen is None else [name for name in names if name in chosen]

    def audited_batch_sizes(self, arm: Arm) -> list[int]:
        """The batch sizes audited on ``arm``'s stages."""
        return arm.audit_batch_sizes if arm.audit_batch_sizes is not None else self.audit.batch_sizes

    def trained_policies(self, arm: Arm) -> list[str]:
        """The policies trained on every seed of ``arm``: the baseline first."""
        names = arm.accuracy_policies if arm.accuracy_policies is not None else list(self.policies)
        return [self.baseline, *(name for name in names if name != self.baseline)]


def experiment_for(
    spec: StudySpec,
    arm: Arm,
    *,
    seed: int,
    policy: str,
    lr: float,
    batch_size: int | None = None,
    attack: bool = False,
    attack_params: dict[str, dict[str, Any]] | None = None,
) -> Experiment:
    """The experiment of one run: ``arm`` under ``policy`` with ``lr`` and ``seed``; validated.

    ``batch_size`` replaces the setting's (audits); ``attack`` adds the arm's portfolio (for the attack actors),
    with ``attack_params`` replacing the arm's parameters of the attacks it names (the budget check).
    """
    setting = spec.settings[arm.setting]
    data: dict[str, Any] = {
        "name": f"{spec.name}-{arm.label}",
        "seed": seed,
        "rounds": arm.rounds,
        "dataset": {**spec.dataset, "partition": setting.partition},
        "model": arm.model,
        "algorithm": {**setting.algorithm, "lr": lr},
        "clients": [
            {
                "group": "c",
                "count": setting.clients,
                "batch_size": batch_size or setting.batch_size,
                "defence": spec.policies[policy],
            }
        ],
        "sampling": {"clients_per_round": setting.clients_per_round},
        "evaluation": {"every": arm.evaluate_every},
        # the study's tasks are all audits and training: none should yield the CPU to the others
        "resources": {"chunk_size": setting.clients_per_round, "attack": {"nice": 0}},
        "tracking": spec.tracking,
    }
    if attack:
        params = {**arm.attack_params, **(attack_params or {})}
        names = arm.attack_names
        data["attack"] = {
            "name": arm.attacks,
            "params": {k: v for k, v in params.items() if k in names},
            # every audited update of a call meets every applicable attack: no per-round cap on the optimisation
            # attacks (auto's default cap is for runs, where a round's audits compete with its training)
            "audit": {"optimisation_per_round": setting.clients},
        }
    return validate(data, source=f"study arm {arm.label}, policy {policy}")


def load_study(path: str | Path) -> StudySpec:
    """Read and check a study file; every run it implies is validated as an experiment (one-line errors)."""
    data, _ = read_yaml(path)
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        message = str(error["msg"]).removeprefix("Value error, ")
        where = format_loc(error["loc"]) if error["loc"] else ""
        raise UserError(f"{path}: {where + ': ' if where else ''}{message}") from None
    for arm in spec.arms:
        for policy in spec.audited_policies(arm):
            for size in spec.audited_batch_sizes(arm):
                experiment_for(
                    spec, arm, seed=spec.seeds[0], policy=policy, lr=arm.lr_grid[0], batch_size=size, attack=True
                )
    return spec
