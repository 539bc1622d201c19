"""Reading a topology YAML file into a validated ``Experiment``, with ``--set`` overrides.

Every failure becomes a ``UserError`` whose message names the file, the field path, the YAML line
where one exists, and what is allowed.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from testbed.config.schema import Experiment
from testbed.errors import UserError

Path_ = tuple[str | int, ...]


def read_yaml(path: str | Path) -> tuple[dict[str, Any], yaml.Node | None]:
    """Parse a YAML file with the safe loader; return the mapping and its node tree (for line numbers)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{file}: no such topology file")
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise UserError(f"{file}: cannot read the topology file ({exc.strerror or type(exc).__name__})") from None
    data, node = load_yaml_text(_decode(raw, file), str(file))
    if not isinstance(data, dict):
        raise UserError(f"{file}: the top level must be a mapping of fields (name, rounds, clients, ...)")
    return data, node


MAX_YAML_NODES = 100_000
"""The most nodes a YAML document may hold with every alias expanded (anchors stay usable; alias bombs do not)."""


class _DuplicateKey(yaml.MarkedYAMLError):
    """A mapping that names the same key twice (PyYAML would keep the last one silently)."""


MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_keys(node: yaml.MappingNode) -> None:
    """Refuse a mapping that gives a scalar key twice (merge keys ``<<`` may still be overridden)."""
    seen: dict[tuple[str, str], int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == MERGE_TAG:
            continue
        key = (key_node.tag, key_node.value)
        if key in seen:
            raise _DuplicateKey(
                None, None, f"duplicate key {key_node.value!r} (first given on line {seen[key]})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def expanded_size(root: yaml.Node, limit: int = MAX_YAML_NODES) -> int:
    """Nodes of the document with every alias expanded, counted without expanding anything.

    Raises ValueError past ``limit`` nodes or on an alias that contains itself; a mapping that gives a key
    twice raises a MarkedYAMLError at the second one.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[id(node)] > limit:
                raise ValueError(f"with its aliases expanded the YAML holds over {limit:,} values")
            continue
        if id(node) in sizes:
            continue
        if id(node) in on_path:
            raise ValueError("an alias refers to a block that contains it (a recursive structure)")
        if isinstance(node, yaml.MappingNode):
            _check_keys(node)
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    return sizes[id(root)]


def load_yaml_text(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """Parse YAML text with the safe loader: duplicate keys, alias bombs and deep nesting are UserErrors.

    Returns the data and its node tree (for line numbers). ``source`` names the file in messages.
    """
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None, None
        expanded_size(node)
        return loader.construct_document(node), node
    except _DuplicateKey as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else "?"
        raise UserError(f"{source}:{line}: {exc.problem}; give each key once") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{source}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise UserError(f"{source}: the YAML is nested too deeply to be a topology file") from None
    except ValueError as exc:  # too many values, a recursive alias, an integer beyond Python's digit limit
        raise UserError(f"{source}: the YAML cannot be read: {str(exc).splitlines()[0][:200]}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _decode(raw: bytes, file: Path) -> str:
    """The file's text: UTF-8 (a byte-order mark is allowed); anything else is a one-line UserError."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(raw) > 1 and (raw[0] == 0 or raw[1] == 0)):
        raise UserError(f"{file}: the file is UTF-16 (or binary), not UTF-8 text; save it as UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{file}: not UTF-8 text (byte {exc.start + 1}, line {line}); a topology file is UTF-8 YAML"
        ) from None
    if "\x00" in text:
        raise UserError(f"{file}: the file holds NUL bytes; a topology file is UTF-8 YAML text")
    return text


def _line_of(node: yaml.Node | None, loc: Path_) -> int | None:
    """The 1-based YAML line of the deepest node that exists along ``loc``."""
    line = None
    for key in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((value for name, value in node.value if name.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            node = None
    if node is not None:
        line = node.start_mark.line + 1
    return line


def format_loc(loc: Iterable[str | int]) -> str:
    """A pydantic location as a field path: ('clients', 0, 'count') -> 'clients[0].count'."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _describe(error: Mapping[str, Any], data: Mapping[str, Any]) -> str:
    """One line for one pydantic error: field path, message, offending value."""
    loc = tuple(part for part in error["loc"] if not (isinstance(part, str) and "[" in part))
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field (check the spelling; `testbed schema` lists the fields)"
    elif error["type"] == "missing":
        message = "required field is missing"
    elif "input" in error and error["type"] not in ("value_error", "assertion_error"):
        value = error["input"]
        if not isinstance(value, dict | list):
            message += f" (got {value!r})"
    if isinstance(data.get("clients"), list) and loc[:1] == ("clients",) and len(loc) > 1:
        index = loc[1]
        groups = data["clients"]
        if isinstance(index, int) and index < len(groups) and isinstance(groups[index], dict):
            name = groups[index].get("group")
            if name:
                message = f"{message} [group {name!r}]"
    field = format_loc(loc)
    head = str(loc[-1]) if loc else ""
    if head and message.startswith(head):
        return f"{format_loc(loc[:-1])}.{message}" if loc[:-1] else message
    if not loc and _field_named_in(message):
        return message
    return f"{field}: {message}"


_FIELD_PREFIX = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\]|\.[A-Za-z_]\w*)*): ")


def _field_named_in(message: str) -> Path_:
    """The field path a message starts with ('sampling.min_clients: ...' -> ('sampling', 'min_clients'))."""
    match = _FIELD_PREFIX.match(message)
    if match is None:
        return ()
    return tuple(int(part) if part.isdigit() else part for part in re.findall(r"[A-Za-z_]\w*|\d+", match.group(1)))


def validate(
    data: Mapping[str, Any], *, source: str = "<config>", node: yaml.Node | None = None, folder: str | None = None
) -> Experiment:
    """Validate a mapping as an Experiment; raise UserError with one line per problem.

    ``folder`` is the topology file's: relative ``defence.path`` values are read from it, and a defence
    part's module beside the file is found there.
    """
    try:
        return Experiment.model_validate(data, context={"folder": folder})
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            loc = tuple(error["loc"]) or _field_named_in(str(error["msg"]).removeprefix("Value error, "))
            line = _line_of(node, loc)
            where = f":{line}" if line is not None else ""
            lines.append(f"{source}{where}: {_describe(error, data)}")
        raise UserError(lines[0] if len(lines) == 1 else "\n".join(lines)) from None
    except ValueError as exc:
        raise UserError(f"{source}: {exc}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is read as YAML (numbers, booleans, lists, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. --set rounds=5")
    try:
        value = load_yaml_text(raw, f"--set {key.strip()}")[0] if raw.strip() else ""
    except UserError as exc:
        if "duplicate key" in str(exc) or "cannot be read" in str(exc) or "nested too deeply" in str(exc):
            raise
        value = raw
    return key.strip(), value


def set_path(data: dict[str, Any], key: str, value: Any, *, origin: str = "--set") -> None:
    """Assign ``value`` at a dotted ``key``; ``clients.<group>.<field>`` selects a client group by name."""
    parts = key.split(".")
    target: Any = data
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[: depth + 1])
        if isinstance(target, list):
            target = _group(target, part, key, origin)
            continue
        if not isinstance(target, dict):
            raise UserError(f"{origin} {key}: {here} is not a block of fields")
        if part not in target or target[part] is None:
            target[part] = {}
        target = target[part]
    last = parts[-1]
    if isinstance(target, list):
        raise UserError(f"{origin} {key}: name a field of the group, e.g. clients.<group>.batch_size")
    if not isinstance(target, dict):
        raise UserError(f"{origin} {key}: {'.'.join(parts[:-1])} is not a block of fields")
    target[last] = value


def _group(groups: list[Any], name: str, key: str, origin: str) -> dict[str, Any]:
    for group in groups:
        if isinstance(group, dict) and str(group.get("group")) == name:
            return group
    if name.isdigit() and int(name) < len(groups) and isinstance(groups[int(name)], dict):
        chosen: dict[str, Any] = groups[int(name)]
        return chosen
    known = [str(group.get("group")) for group in groups if isinstance(group, dict)]
    raise UserError(f"{origin} {key}: no client group {name!r}; groups: {', '.join(known)}")


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of ``data`` with every ``key=value`` applied; the same key twice with two values is an error."""
    result = copy.deepcopy(dict(data))
    seen: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        if key in seen and seen[key] != value:
            raise UserError(f"--set {key}: given twice with different values ({seen[key]!r} and {value!r})")
        seen[key] = value
        set_path(result, key, value)
    return result
