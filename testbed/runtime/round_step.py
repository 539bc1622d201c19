"""The server's half of a round, without Ray: accept the round, then step the global state.

The engine's root aggregator and its round loop call these, and so does the study's trainer
(``testbed.study.training``), so that a study trains exactly as ``testbed run`` does: the mean update
descended or added by ``server_step``, the accepted clients' buffers (BatchNorm statistics) averaged
beside it, and a round with fewer accepted updates than ``sampling.min_clients`` stopping the run.
"""

from __future__ import annotations

from testbed.config.schema import Experiment
from testbed.errors import RunAborted
from testbed.runtime.aggregation import global_step

__all__ = ["RunAborted", "check_accepted", "global_step"]


def check_accepted(accepted: float, experiment: Experiment, round_index: int) -> None:
    """Raise RunAborted when a round accepted fewer updates than ``sampling.min_clients``."""
    if accepted < experiment.sampling.min_clients:
        raise RunAborted(
            f"round {round_index + 1}: only {int(accepted)} updates accepted, fewer than "
            f"sampling.min_clients={experiment.sampling.min_clients}; the run stops here"
        )
