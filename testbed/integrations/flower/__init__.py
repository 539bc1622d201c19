"""Audit a Flower app: the testbed's attacks and leakage on the updates Flower clients send (``pip install
'fl-privacy-testbed[flower]'``; docs/integrations.md).

``FlowerAuditor`` and ``Reply`` need nothing from Flower; ``AuditedStrategy`` (a strategy wrapper),
``ground_truth_mod`` and ``record_trained`` (scoring in simulations) import ``flwr`` when first used.
"""

from __future__ import annotations

from typing import Any

from testbed.integrations.flower.auditor import FlowerAuditor, Reply, RoundAudit

__all__ = ["AuditedStrategy", "FlowerAuditor", "Reply", "RoundAudit", "ground_truth_mod", "record_trained"]


def __getattr__(name: str) -> Any:
    """``AuditedStrategy``, ``ground_truth_mod`` and ``record_trained`` import Flower on first use."""
    if name == "AuditedStrategy":
        from testbed.integrations.flower.strategy import AuditedStrategy

        return AuditedStrategy
    if name in ("ground_truth_mod", "record_trained"):
        from testbed.integrations.flower import mod

        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
