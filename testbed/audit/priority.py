"""The CPU priority of audit actors: attacks and scoring yield the CPU to the client workers."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def lower_priority(nice: int) -> None:
    """Raise this process's nice value by ``nice`` (Linux and macOS), so client workers get the CPU first."""
    if nice > 0 and hasattr(os, "nice"):
        try:
            os.nice(nice)
        except OSError as exc:  # not permitted here: keep the normal priority
            log.warning("could not lower the priority of an audit actor: %s", exc)
