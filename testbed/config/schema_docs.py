"""The configuration reference (docs/configuration.md), generated from the schema itself."""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from testbed.config.schema import Experiment

INTRO = """# Configuration reference

Generated from `testbed/config/schema.py` by `testbed schema --markdown`; do not edit by hand. Every block
rejects unknown fields. `testbed schema` prints the same as JSON Schema, and `testbed validate FILE`
checks a file against it.
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return " | ".join(str(arg) for arg in typing.get_args(annotation))
    if origin in (list, dict):
        inner = ", ".join(_type_name(arg) for arg in typing.get_args(annotation))
        return f"{origin.__name__}[{inner}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation)).replace("Config", "")


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(block)"
        return f"`{json.dumps(value)}`"
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{json.dumps(field.default)}`"


def _blocks(model: type[BaseModel], path: str, seen: list[tuple[str, type[BaseModel]]]) -> None:
    seen.append((path, model))
    for name, field in model.model_fields.items():
        annotation = field.annotation
        candidates = typing.get_args(annotation) or (annotation,)
        for candidate in candidates:
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                suffix = "[]" if typing.get_origin(annotation) is list else ""
                _blocks(candidate, f"{path}.{name}{suffix}" if path else f"{name}{suffix}", seen)


def _block_hint(path: str, name: str, field: Any) -> str:
    args = typing.get_args(field.annotation) or (field.annotation,)
    if any(isinstance(arg, type) and issubclass(arg, BaseModel) for arg in args):
        return f"see `{path + '.' if path else ''}{name}`"
    return ""


def markdown() -> str:
    """The whole reference as markdown: one table per block."""
    blocks: list[tuple[str, type[BaseModel]]] = []
    _blocks(Experiment, "", blocks)
    lines = [INTRO]
    done: set[str] = set()
    for path, model in blocks:
        if path in done:
            continue
        done.add(path)
        lines.append(f"## `{path or '(top level)'}`\n")
        lines.append((model.__doc__ or "").strip() + "\n")
        lines.append("| field | type | default | meaning |")
        lines.append("| --- | --- | --- | --- |")
        for name, field in model.model_fields.items():
            meaning = (field.description or _block_hint(path, name, field)).replace("|", "\\|")
            kind = _type_name(field.annotation).replace("|", "\\|")
            lines.append(f"| `{name}` | {kind} | {_default(field)} | {meaning} |")
        lines.append("")
    return "\n".join(lines)
