"""The attack portfolio and the no-information baselines: config, worst case per sample, recovery beyond
what the attacker knew anyway."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks import Reconstruction
from metrics import (
    BASELINES,
    BaselineCache,
    ClassPrototypes,
    baseline_scores,
    best_baseline,
    recovered,
    recovered_beyond,
)
from metrics.paired import paired_avd, paired_ssim
from testbed.audit.outcome import AuditOutcome
from testbed.audit.scoring import score_outcomes
from testbed.audit.worst_case import summarise, worst_cases
from testbed.config.schema import AttackConfig, Experiment
from testbed.data.datasets import load_dataset
from testbed.runtime.scheduling import audited_clients, optimisation_clients, sample_clients


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    data = load_dataset("mnist-5k", seed=0)
    return data.train_x, data.train_y, data.test_x, data.test_y


def test_portfolio_config_lists_attacks_with_their_own_parameters() -> None:
    names = ["dense-ratio", "inverting-gradients"]
    config = AttackConfig(name=names, params={"inverting-gradients": {"iterations": 5}})
    assert config.names == ["dense-ratio", "inverting-gradients"]
    assert config.params_of("inverting-gradients") == {"iterations": 5} and config.params_of("dense-ratio") == {}
    assert AttackConfig(name="dlg", params={"iterations": 3}).params_of("dlg") == {"iterations": 3}
    for bad, message in [
        ({"name": []}, "non-empty list"),
        ({"name": ["dlg", "dlg"]}, "dlg listed more than once"),
        ({"name": ["dlg"], "params": {"iterations": 3}}, "iterations is not in attack.name"),
        ({"name": ["dlg"], "params": {"dlg": 3}}, "attack.params.dlg: expected a mapping"),
        ({"name": ["dlg", "nope"]}, "unknown attack 'nope'"),
        ({"name": ["dlg"], "params": {"dlg": {"iterations": 0}}}, "iterations"),
    ]:
        with pytest.raises(ValueError, match=message):
            AttackConfig(**bad)


def test_auto_is_the_default_and_runs_every_image_attack_with_their_own_parameters() -> None:
    config = AttackConfig()
    assert config.name == "auto" and config.is_portfolio
    assert config.names == ["dense-ratio", "ce-demix", "dlg", "inverting-gradients", "cocktail-party"]
    assert "label-inference" not in config.names
    assert config.optimisation_cap == 4
    tuned = AttackConfig(
        name="auto", params={"inverting-gradients": {"iterations": 5}}, audit={"optimisation_per_round": 9}
    )
    assert tuned.params_of("inverting-gradients") == {"iterations": 5} and tuned.params_of("dlg") == {}
    assert tuned.optimisation_cap == 9
    assert AttackConfig(name="inverting-gradients").optimisation_cap is None  # a named attack runs on every update
    assert tuned.label.startswith("auto: worst case of dense-ratio")
    for bad, message in [
        ({"name": "auto", "params": {"iterations": 3}}, "iterations is not in attack.name"),
        ({"name": ["auto", "dlg"]}, "auto runs dlg already; list it once"),
        ({"audit": {"optimisation_per_round": 0}}, "greater than or equal to 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            AttackConfig(**bad)


def test_the_optimisation_cap_draws_a_fixed_subset_of_each_rounds_audited_clients() -> None:
    experiment = Experiment.model_validate(
        {
            "name": "cap",
            "rounds": 3,
            "clients": [{"group": "a", "count": 40, "batch_size": 2}],
            "attack": {"audit": {"clients_per_round": 10}},
        }
    )
    for round_index in range(3):
        audited = set(audited_clients(experiment, round_index, sample_clients(experiment, round_index)).tolist())
        chosen = optimisation_clients(experiment, round_index, 4)
        assert len(audited) == 10 and len(chosen) == 4 and chosen <= audited
        assert chosen == optimisation_clients(experiment, round_index, 4)
        assert optimisation_clients(experiment, round_index, 10) == audited


def test_baselines_score_what_the_attacker_knew_anyway(mnist: tuple[np.ndarray, ...]) -> None:
    train_x, train_y, test_x, test_y = mnist
    prototypes = ClassPrototypes(test_x, test_y)
    originals, labels = train_x[:600], train_y[:600]
    drawn = prototypes.draw(labels, np.random.default_rng(0))
    assert set(drawn) == set(BASELINES)
    assert np.array_equal(drawn["class_mean"][0], test_x[test_y == labels[0]].mean(axis=0))
    for image, label in zip(drawn["class_random"][:20], labels[:20], strict=True):
        assert int(test_y[np.flatnonzero((test_x == image).all(axis=(1, 2, 3)))[0]]) == label
    scores = baseline_scores(originals, drawn)
    as64 = originals.astype(np.float64), drawn["class_mean"].astype(np.float64)  # baselines are scored in float64
    np.testing.assert_allclose(scores["class_mean"]["avd"], paired_avd(*as64), rtol=1e-12)
    # docs/metrics.md: a blank image scores about 0.42 AVD on MNIST and a class mean about 0.36, both far
    # better than a failed reconstruction (1.0-1.7), though neither holds any information about the sample
    assert 0.38 < float(np.mean(scores["blank"]["avd"])) < 0.46
    assert 0.32 < float(np.mean(scores["class_mean"]["avd"])) < 0.40
    assert float(np.mean(scores["class_mean"]["ssim"])) > float(np.mean(scores["blank"]["ssim"]))
    best = best_baseline(scores)
    assert np.all(best["avd"] <= scores["blank"]["avd"]) and np.all(best["ssim"] >= scores["class_random"]["ssim"])


def test_a_class_mean_is_not_a_reconstruction(mnist: tuple[np.ndarray, ...]) -> None:
    train_x, train_y, test_x, test_y = mnist
    prototypes = ClassPrototypes(test_x, test_y)
    labels = train_y[:50]
    drawn = prototypes.draw(labels, np.random.default_rng(1))
    # originals that ARE their class mean, "reconstructed" as that class mean: past every threshold, yet no
    # better than the baseline, so not recovered; an exact copy of a real sample is recovered
    means = drawn["class_mean"]
    scores = {"ssim": paired_ssim(means, means), "avd": paired_avd(means, means)}
    assert recovered(scores).all()
    assert not recovered_beyond(scores, baseline_scores(means, drawn)).any()
    originals = train_x[:50]
    exact = {"ssim": paired_ssim(originals, originals), "avd": paired_avd(originals, originals)}
    assert recovered_beyond(exact, baseline_scores(originals, drawn)).all()


def _outcome(client: int, attack: str, images: np.ndarray, labels: np.ndarray | None = None) -> AuditOutcome:
    tensor_labels = torch.as_tensor(labels) if labels is not None else None
    return AuditOutcome(client, "g", 0, "root", Reconstruction(torch.as_tensor(images), tensor_labels), attack=attack)


def test_worst_case_takes_each_sample_from_the_attack_that_recovered_it(mnist: tuple[np.ndarray, ...]) -> None:
    train_x, train_y, test_x, test_y = mnist
    indices = np.arange(4)
    originals = train_x[indices]
    # attack a recovers samples 0 and 1 exactly (blank for 2, 3); attack b the other way round
    a = originals.copy()
    a[2:] = 0.0
    b = originals.copy()
    b[:2] = 0.0
    outcomes = [
        _outcome(7, "a", a, train_y[indices]),
        _outcome(7, "b", b, np.zeros(4, dtype=np.int64)),
        AuditOutcome(7, "g", 0, "root", None, "c: does not apply", attack="c"),
    ]
    baselines = BaselineCache(ClassPrototypes(test_x, test_y), train_x, train_y, seed=3)
    audit = score_outcomes(outcomes, {7: indices}, train_x, train_y, 0, 1, baselines)
    assert audit.not_applicable == [("g", "c", "c: does not apply")]
    by_attack = {item.outcome.attack: item for item in audit.scored}
    assert by_attack["a"].flags.tolist() == [True, True, False, False]
    assert by_attack["b"].flags.tolist() == [False, False, True, True]
    assert all(item.outcome.reconstruction is not None for item in audit.scored)  # the grid client, every attack
    [case] = worst_cases(audit.scored)
    assert case.chosen == ["a", "a", "b", "b"]
    assert case.client.flags.all() and np.allclose(case.client.result.scores["ssim"], 1.0)
    assert case.client.label_accuracy == 1.0 and case.client.labels_exact is True  # the better label leak
    summary = summarise([case.client])
    assert summary["recovered_fraction"] == 1.0 and summary["label_histogram_exact"] == 1.0
    assert summarise([by_attack["a"]])["recovered_fraction"] == 0.5
    assert 0.3 < summary["avd_baseline"] < 0.5  # the best baseline's AVD, logged beside the attack's


def test_baseline_cache_scores_each_sample_once_and_as_the_direct_path(mnist: tuple[np.ndarray, ...]) -> None:
    train_x, train_y, test_x, test_y = mnist
    cache = BaselineCache(ClassPrototypes(test_x, test_y), train_x, train_y, seed=5)
    first = np.array([3, 1, 4, 1, 5, 9, 2, 6])  # sample 1 twice, as when two attacks score one client
    scores = cache.scores(first)
    unique = np.unique(first)
    direct = baseline_scores(train_x[unique], cache.prototypes.draw_at(train_y[unique], cache.positions[unique]))
    where = np.searchsorted(unique, first)
    for name in BASELINES:
        for metric, values in scores[name].items():
            np.testing.assert_array_equal(values, direct[name][metric][where])
    assert int(cache.known.sum()) == len(unique)
    # a later round touching old and new samples scores only the new ones; old scores do not move
    before = cache.table[unique].copy()
    later = cache.scores(np.array([9, 7, 3]))
    assert int(cache.known.sum()) == len(unique) + 1
    np.testing.assert_array_equal(cache.table[unique], before)
    assert later["class_random"]["ssim"][0] == scores["class_random"]["ssim"][5]
    # the random class image is the sample's own draw: of its class, and the same for another cache with the seed
    again = BaselineCache(ClassPrototypes(test_x, test_y), train_x, train_y, seed=5)
    np.testing.assert_array_equal(again.scores(first)["class_random"]["avd"], scores["class_random"]["avd"])
    picks = cache.prototypes.draw_at(train_y[first], cache.positions[first])["class_random"]
    for image, label in zip(picks, train_y[first], strict=True):
        assert int(test_y[np.flatnonzero((test_x == image).all(axis=(1, 2, 3)))[0]]) == label
