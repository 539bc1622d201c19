"""A user's own code named by import path, ``package.module:callable``: models, data sets and defence parts.

The one search rule for all of them: the module is looked up first in a recorded folder (the topology
file's folder, or the working directory, where the module was found when the file was loaded:
``recorded_folder``), then in the working directory, then on ``sys.path`` (which holds PYTHONPATH and the
installed packages). Every problem is an ``ImportPathError`` with a one-line message that the caller
prefixes with the field (``model.name``, ``dataset.name``, ``defence.loss``).

It lives here, with no import of the engine, so that both ``defenses`` (which may not import ``testbed``)
and the engine resolve import paths with it.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import inspect
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
IMPORT_PATH = re.compile(rf"^{_IDENTIFIER}(\.{_IDENTIFIER})*:{_IDENTIFIER}(\.{_IDENTIFIER})*$")
"""``package.module:callable``; the attribute may itself be dotted (``module:Class.factory``)."""


class ImportPathError(ValueError):
    """A callable named by import path cannot be found or used; the message is one line."""


def is_import_path(name: str) -> bool:
    """Whether ``name`` has the form ``package.module:callable``."""
    return IMPORT_PATH.match(name) is not None


def split_import_path(name: str) -> tuple[str, str]:
    """``(module, attribute)`` of an import path."""
    if not is_import_path(name):
        raise ImportPathError(f"{name!r} is not an import path of the form package.module:callable")
    module, _, attribute = name.partition(":")
    return module, attribute


def _top_level(name: str) -> str:
    return split_import_path(name)[0].split(".")[0]


def find_folder(name: str, candidates: Sequence[str | Path]) -> str | None:
    """The first of ``candidates`` (folders) that holds the top-level package or module of ``name``.

    Nothing is imported; the folder comes back absolute, or None when no candidate holds the module.
    """
    top = _top_level(name)
    for folder in candidates:
        path = Path(folder).resolve()
        if path.is_dir() and importlib.machinery.PathFinder.find_spec(top, [str(path)]) is not None:
            return str(path)
    return None


def recorded_folder(names: Sequence[str], path: str | None, base: str | Path | None) -> str | None:
    """The folder to record for import-path modules ``names`` read from a file in folder ``base``.

    A given ``path`` comes back absolute (relative to ``base``, or to the working directory without one);
    otherwise the first of ``base`` and the working directory that holds the first of ``names`` found there,
    or None (the modules come from PYTHONPATH, or are reported missing when imported).
    """
    if path is not None:
        anchor = Path(base) if base is not None else Path.cwd()
        return str((anchor / Path(path).expanduser()).resolve())
    candidates = [*([base] if base is not None else []), Path.cwd()]
    for name in names:
        found = find_folder(name, candidates)
        if found is not None:
            return found
    return None


def _installed_roots() -> list[Path]:
    """Folders of installed packages and of the standard library: their modules are on every node."""
    roots = {sysconfig.get_paths()[key] for key in ("purelib", "platlib", "stdlib", "platstdlib")}
    return [Path(root).resolve() for root in roots if root]


def module_location(name: str, folder: str | None) -> Path | None:
    """Where the top-level package (its folder) or module (its ``.py`` file) of ``name`` lives.

    None when it is not found, is not a plain file or folder (a compiled or namespace package), or lies
    among the installed packages (those are expected on every node of a cluster, so nothing is shipped).
    """
    top = _top_level(name)
    search = [folder] if folder else []
    spec = importlib.machinery.PathFinder.find_spec(top, [*search, os.getcwd(), *sys.path])
    if spec is None or spec.origin is None or not spec.has_location:
        return None
    origin = Path(spec.origin).resolve()
    location = origin.parent if spec.submodule_search_locations is not None else origin
    if location.suffix not in ("", ".py"):
        return None
    if any(location.is_relative_to(root) for root in _installed_roots()):
        return None
    return location


def _search_path(module: str, folder: str | None) -> None:
    """Put ``folder`` (when it exists here), then the working directory if it holds the module, on sys.path."""
    top = module.split(".")[0]
    if folder and Path(folder).is_dir() and folder not in sys.path:
        sys.path.insert(0, folder)
    cwd = os.getcwd()
    if (
        cwd not in sys.path
        and importlib.machinery.PathFinder.find_spec(top, sys.path) is None
        and importlib.machinery.PathFinder.find_spec(top, [cwd]) is not None
    ):
        sys.path.append(cwd)


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _stopped(exc: BaseException) -> str:
    """One line for what ended a user call: its exception, or the exit it asked for."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    if isinstance(exc, KeyboardInterrupt):
        return "it raised KeyboardInterrupt"
    return _first_line(exc)


def _check_origin(module: str, folder: str | None) -> None:
    """Refuse a module already imported in this process from somewhere else than ``folder``."""
    loaded = sys.modules.get(module)
    if loaded is None or not folder or not Path(folder).is_dir():
        return
    origin = getattr(loaded, "__file__", None)
    if origin is not None and not Path(origin).resolve().is_relative_to(Path(folder).resolve()):
        raise ImportPathError(
            f"module {module!r} is already imported from {origin}, not from {folder}; "
            "rename one of them or start a new process"
        )


def load_callable(name: str, folder: str | None = None) -> Callable[..., Any]:
    """Import the module of ``name`` and return its callable (see the module docstring for the search order)."""
    module_name, attribute = split_import_path(name)
    _search_path(module_name, folder)
    _check_origin(module_name, folder)
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            where = f"{folder}, " if folder else ""
            raise ImportPathError(
                f"cannot import {module_name!r}: no module {missing!r} in {where}the working directory or PYTHONPATH"
            ) from None
        raise ImportPathError(f"importing {module_name!r} failed: {_first_line(exc)}") from None
    except (Exception, SystemExit, KeyboardInterrupt) as exc:  # the module raised, or called sys.exit at import
        raise ImportPathError(f"importing {module_name!r} failed: {_stopped(exc)}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ImportPathError(f"{module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ImportPathError(f"{name!r} is not callable (it is a {type(target).__name__})")
    function: Callable[..., Any] = target
    return function


def accepts(function: Callable[..., Any], parameter: str) -> bool:
    """Whether ``function`` names ``parameter`` among its parameters (a ``**kwargs`` catch-all does not count)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return False
    found = signature.parameters.get(parameter)
    return found is not None and found.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def call(name: str, function: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """``function(**kwargs)``, any exception it raises turned into one line that names the call."""
    try:
        return function(**kwargs)
    except (Exception, SystemExit, KeyboardInterrupt) as exc:  # sys.exit() in user code ends the call, not the CLI
        shown = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
        raise ImportPathError(f"{name}({shown[:200]}) failed: {_stopped(exc)}") from None
