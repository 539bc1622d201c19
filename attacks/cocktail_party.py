"""Cocktail Party Attack (Kariyappa et al., ICML 2023): blind source separation of the first dense layer.

The weight gradient of a dense layer that reads the flattened input is ``gW = A X`` with ``X`` the batch's
inputs (one per row) and ``A`` an unknown ``H x B`` mixing matrix (one row per hidden unit), whatever the
labels and the loss. Independent component analysis on the rows of ``gW`` recovers the inputs up to order,
sign and scale. The numerical work lives in :mod:`attacks.ica`; this module is the attack's interface.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import ClassVar

import torch

from attacks.base import Attack
from attacks.ica import PENALTIES, IcaSettings, calibrate, separate
from attacks.layers import first_dense_on_image, summed_gradient
from attacks.params import Param
from attacks.view import AttackerView, AttackNotApplicable, Reconstruction


class CocktailParty(Attack):
    """ICA on the first dense layer's weight gradient: one recovered input per sample of the update.

    Centring and whitening to ``B = num_samples`` components, then an unmixing matrix found by Adam on a
    negentropy (log cosh) objective, a weighted decorrelation penalty between the recovered sources and a
    total-variation prior. Each source's sign, scale and offset then come from the layer's own gradients
    (``attacks.ica.calibrate``: the bias gradient sums the same per-sample columns as the weight gradient),
    with the skewness/median/maximum rule as the fallback where the sources do not explain both.
    ``reconstruct_many`` unmixes all views of equal shapes together (batched matrix products).
    """

    name: ClassVar[str] = "cocktail-party"
    parameters: ClassVar[dict[str, Param]] = {
        "iterations": Param(1000, int, minimum=1, help="Adam steps on the unmixing matrix"),
        "lr": Param(0.01, float, minimum=0.0, strictly_above=True, help="Adam step size"),
        "negentropy_weight": Param(1.0, float, minimum=0.0, help="weight of the log cosh negentropy term"),
        "decorrelation": Param(
            "log-det", str, choices=PENALTIES, help="penalty on correlated sources: -log det C, or exp(T |C_ij|)"
        ),
        "decorrelation_weight": Param(6.0, float, minimum=0.0, help="weight of the decorrelation penalty"),
        "temperature": Param(5.0, float, minimum=0.0, help="T of the exp-cosine penalty (unused by log-det)"),
        "tv_weight": Param(30.0, float, minimum=0.0, help="weight of the total-variation prior on the sources"),
        "seed": Param(0, int, minimum=0, help="seed of the random orthogonal initial unmixing matrix"),
        "rtol": Param(1e-9, float, minimum=0.0, help="whitening eigenvalues below rtol * largest are clamped"),
        "patience": Param(
            300, int, minimum=0, help="Adam steps without a min_delta improvement that end the run (0: no early stop)"
        ),
        "min_delta": Param(1e-4, float, minimum=0.0, maximum=0.5, help="relative fall of the objective that counts"),
        "check_every": Param(25, int, minimum=1, help="steps between two checks of the plateau rule"),
    }

    def check(self, view: AttackerView) -> None:
        """The first dense layer must read the flattened input and have at least ``num_samples`` units."""
        layer = first_dense_on_image(view.model, view.input_shape, self.name)
        if layer.module.out_features < view.num_samples:
            raise AttackNotApplicable(
                f"{self.name}: the first dense layer has {layer.module.out_features} units, "
                f"fewer than the {view.num_samples} samples to separate"
            )

    def _settings(self) -> IcaSettings:
        p = self.params
        return IcaSettings(
            iterations=p["iterations"],
            lr=p["lr"],
            negentropy_weight=p["negentropy_weight"],
            decorrelation=p["decorrelation"],
            decorrelation_weight=p["decorrelation_weight"],
            temperature=p["temperature"],
            tv_weight=p["tv_weight"],
            seed=p["seed"],
            rtol=p["rtol"],
            patience=p["patience"],
            min_delta=p["min_delta"],
            check_every=p["check_every"],
        )

    def _reconstruct(self, view: AttackerView) -> Reconstruction:
        return self._run([view])[0]

    def batch_key(self, view: AttackerView) -> Hashable:
        """Views of equal shapes are unmixed together; same result as one by one."""
        layer = first_dense_on_image(view.model, view.input_shape, self.name)
        return (tuple(layer.module.weight.shape), view.num_samples, view.input_shape)

    def _reconstruct_batch(self, views: Sequence[AttackerView]) -> list[Reconstruction]:
        return self._run(views)

    def _run(self, views: Sequence[AttackerView]) -> list[Reconstruction]:
        """Unmix views whose first layers have one shape and whose updates hold one number of samples."""
        layer = first_dense_on_image(views[0].model, views[0].input_shape, self.name)
        mixtures = torch.stack([summed_gradient(view, layer.weight_key) for view in views])
        separation = separate(mixtures, views[0].num_samples, views[0].input_shape, self._settings(), self.device)
        biases = torch.stack([summed_gradient(view, layer.bias_key) for view in views])
        calibration = calibrate(separation.sources, mixtures, biases)
        images = calibration.images.reshape(len(views), -1, *views[0].input_shape)
        return [
            Reconstruction(
                images=images[index],
                labels=None,
                diagnostics={
                    "components": float(separation.sources.shape[1]),
                    "rank": float(separation.rank[index]),
                    "objective": float(separation.objective[index]),
                    "max_correlation": float(separation.max_correlation[index]),
                    "iterations": float(separation.iterations[index]),
                    "calibrated_by_bias": float(calibration.by_bias[index]),
                    "calibration_residual": float(calibration.residual[index]),
                },
            )
            for index in range(len(views))
        ]
