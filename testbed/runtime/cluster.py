"""Starting or joining the Ray cluster a run uses, and always leaving it as it was found."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from testbed.config.schema import Experiment, ResourcesConfig
from testbed.errors import UserError
from testbed.runtime.user_models import runtime_env

PROJECT_PACKAGES = ("testbed", "attacks", "defenses", "metrics")
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_HINT = (
    "the Ray cluster at {address!r} refused this machine's authentication token (InvalidAuthToken); copy the head "
    "node's ~/.ray/auth_token to this machine (or set RAY_AUTH_TOKEN to its contents), set RAY_AUTH_MODE=token "
    "and run again (README: Joining a multi-node Ray cluster)"
)
"""The one-line hint when a cluster with token authentication (Ray's default) does not accept ours."""


class _TokenNotice(logging.Filter):
    """Drops Ray's notice that a new local cluster uses token authentication (its default, not a problem)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _quiet_environment() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    notices = logging.getLogger(TOKEN_NOTICE_LOGGER)
    if not any(isinstance(item, _TokenNotice) for item in notices.filters):
        notices.addFilter(_TokenNotice())


def _project_modules() -> list[str]:
    """Folders of the project's packages, shipped to the nodes of a joined cluster."""
    import importlib

    return [str(Path(importlib.import_module(name).__file__ or "").parent) for name in PROJECT_PACKAGES]


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes, when a host:port cluster address does not answer."""
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"resources.address: expected null, auto or HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except OSError as exc:
        raise UserError(
            f"resources.address: cannot reach the Ray cluster at {address!r}: {exc.strerror or exc}"
        ) from None


def _check_token(address: str) -> None:
    """Fail in one line when the cluster's token authentication refuses this machine.

    ``ray.init`` would retry for about 20 s, printing a warning each second, and then report a generic
    connection failure; a direct client of the cluster's control store is refused at once.
    """
    import ray

    try:
        from ray._raylet import GcsClient  # type: ignore[attr-defined]
    except ImportError:  # a Ray without this client: ray.init reports the problem itself
        return
    try:
        GcsClient(address=address.split("://", 1)[-1])
    except ray.exceptions.AuthenticationError:
        raise UserError(f"resources.address: {TOKEN_HINT.format(address=address)}") from None
    except Exception:  # any other problem is reported by ray.init, with its own words
        return


def check_address(resources: ResourcesConfig) -> None:
    """Fail fast when a host:port cluster address does not answer or refuses our token (before anything is written)."""
    if resources.address not in (None, "auto"):
        _check_reachable(resources.address)
        _check_token(resources.address)


@contextmanager
def ray_session(resources: ResourcesConfig, experiment: Experiment | None = None) -> Iterator[dict[str, Any]]:
    """Start a local Ray (address null) or join a cluster (auto / host:port); shut down what was started.

    Yields the cluster's total resources. A local instance advertises 127.0.0.1 as its node address and
    starts no dashboard web UI; Ray's own servers still listen on every interface, guarded by Ray's token
    authentication (its default for a new local cluster). When joining, the project's packages travel
    to the worker nodes through Ray's runtime environment, so a node needs only the installed
    dependencies. The user's own modules named by ``experiment`` (an import-path model or data set) reach
    the workers through the runtime environment too (``testbed.runtime.user_models.runtime_env``).
    """
    _quiet_environment()
    import ray

    if ray.is_initialized():
        yield dict(ray.cluster_resources())
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    if resources.address is None:
        kwargs.update(num_cpus=resources.num_cpus or os.cpu_count() or 1, _node_ip_address="127.0.0.1")
        own = runtime_env(experiment, joined=False) if experiment is not None else {}
        if own:
            kwargs.update(runtime_env=own)
    else:
        check_address(resources)
        own = runtime_env(experiment, joined=True) if experiment is not None else {}
        modules = [*_project_modules(), *own.get("py_modules", [])]
        kwargs.update(address=resources.address, runtime_env={"py_modules": modules})
    try:
        ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError, ray.exceptions.RayError) as exc:
        text = str(exc).strip()
        if isinstance(exc, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in text:
            raise UserError(f"resources.address: {TOKEN_HINT.format(address=resources.address)}") from None
        first = text.splitlines()[0] if text else type(exc).__name__
        raise UserError(f"resources.address: cannot reach the Ray cluster {resources.address!r}: {first}") from None
    try:
        yield dict(ray.cluster_resources())
    finally:
        ray.shutdown()


def check_resources(resources: ResourcesConfig, available: dict[str, Any], *, auditing: bool = False) -> int:
    """Number of client workers to start; a clear error if the cluster cannot host one of them.

    When audits run, the attack actors' CPUs and GPUs are set aside first so they can be placed.
    """
    cpus = float(available.get("CPU", 0))
    gpus = float(available.get("GPU", 0))
    if auditing:
        attack = resources.attack
        if attack.num_gpus > 0 and gpus == 0:
            raise UserError(
                f"resources.attack.num_gpus: {attack.num_gpus:g} GPU per attack actor requested, "
                "but the cluster has no GPU"
            )
        cpus = max(cpus - attack.workers * attack.num_cpus, resources.client.num_cpus)
        gpus = max(gpus - attack.workers * attack.num_gpus, 0.0)
    wanted = resources.client
    if wanted.num_gpus > 0 and gpus == 0:
        raise UserError(
            f"resources.client.num_gpus: {wanted.num_gpus:g} GPU per worker requested, but the cluster has no GPU"
        )
    if wanted.num_cpus > cpus:
        raise UserError(f"resources.client.num_cpus: {wanted.num_cpus:g} per worker, but the cluster has {cpus:g} CPUs")
    if resources.workers is not None:
        return resources.workers
    fits = [cpus / wanted.num_cpus if wanted.num_cpus > 0 else float("inf")]
    if wanted.num_gpus > 0:
        fits.append(gpus / wanted.num_gpus)
    return max(1, min(int(min(fits)), 64))
