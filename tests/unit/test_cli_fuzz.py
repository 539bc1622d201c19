"""Seeded fuzzing of ``testbed validate``: mutated topology files never end in a traceback.

Each case starts from a shipped topology (or a small valid one) and mutates it: random bytes, a
truncated file, flipped bytes, a wrong type or a huge number at a random field path, deep nesting, a
deleted or unknown field. ``validate`` must answer ``FILE: OK`` (exit 0) or one line per problem
(exit 2); exit status 1 means an unexpected exception reached the CLI's last line of defence, which is
a missing check.
"""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.cli import main

TOPOLOGIES = sorted(Path(__file__).resolve().parents[2].joinpath("topologies").glob("*.yaml"))
SMALL = "name: fuzz\nrounds: 2\nmodel: {name: softmax}\nclients: [{group: a, count: 4, batch_size: 2}]\n"
CASES_PER_SEED = 60
SEEDS = range(5)  # 300 mutated files in all

ODD_VALUES: list[Any] = [
    None,
    True,
    -1,
    0,
    10**30,
    -(10**30),
    1e308,
    float("inf"),
    float("nan"),
    "",
    "x" * 5000,
    "\u00e9\u00df\u4e2d\U0001f600",
    [],
    [1, "a", None],
    {},
    {"unknown": 1},
    [[[[[]]]]],
    2**63,
    "1e999",
    "-inf",
]


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every field path of a parsed YAML document (mapping keys and list indices)."""
    found = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += _paths(value, (*prefix, index))
    return found


def _set(data: Any, path: tuple[Any, ...], value: Any, *, delete: bool = False) -> None:
    target = data
    for part in path[:-1]:
        target = target[part]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value


def _dump(data: Any) -> bytes:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode("utf-8")


def _mutations(rng: random.Random, text: str) -> list[Callable[[], bytes]]:
    raw = text.encode("utf-8")
    data = yaml.safe_load(text)

    def random_bytes() -> bytes:
        return rng.randbytes(rng.randint(0, 600))

    def truncated() -> bytes:
        return raw[: rng.randint(0, len(raw))]

    def flipped() -> bytes:
        mutable = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            mutable[rng.randrange(len(mutable))] = rng.randrange(256)
        return bytes(mutable)

    def wrong_value() -> bytes:
        copy = yaml.safe_load(text)
        _set(copy, rng.choice(_paths(copy)), rng.choice(ODD_VALUES))
        return _dump(copy)

    def deleted_field() -> bytes:
        copy = yaml.safe_load(text)
        _set(copy, rng.choice(_paths(copy)), None, delete=True)
        return _dump(copy)

    def deep_nesting() -> bytes:
        depth = rng.choice([50, 500, 5000, 50000])
        copy = yaml.safe_load(text)
        _set(copy, rng.choice(_paths(copy)), None)
        nested = "[" * depth + "]" * depth if rng.random() < 0.5 else "{a: " * depth + "1" + "}" * depth
        return _dump(copy).replace(b"null", nested.encode(), 1)

    def huge_number_text() -> bytes:
        number = rng.choice(["9" * 5000, "1e99999", "-" + "9" * 40, "0x" + "f" * 100, ".inf", "1_000_000_000_000"])
        copy = yaml.safe_load(text)
        _set(copy, rng.choice(_paths(copy)), "PLACEHOLDER")
        return _dump(copy).replace(b"PLACEHOLDER", number.encode(), 1)

    def yaml_tricks() -> bytes:
        return rng.choice(
            [
                b"!!python/object/apply:os.system ['true']\n",
                b"a: &x [*x]\n",
                b"name: x\nname: y\nrounds: 1\n" + raw,
                b"--- 1\n--- 2\n",
                b"\xef\xbb\xbf" + raw,
                b"? [a, b]\n: 1\n",
                raw.replace(b": ", b":\t", 3),
                b"\x00" * 10,
            ]
        )

    assert isinstance(data, dict)
    return [random_bytes, truncated, flipped, wrong_value, deleted_field, deep_nesting, huge_number_text, yaml_tricks]


def _validate(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["validate", str(path)])
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("seed", SEEDS)
def test_mutated_topologies_never_end_in_a_traceback(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    sources = [path.read_text(encoding="utf-8") for path in TOPOLOGIES] + [SMALL]
    outcomes = {0: 0, 2: 0}
    for case in range(CASES_PER_SEED):
        text = rng.choice(sources)
        mutate = rng.choice(_mutations(rng, text))
        content = mutate()
        path = tmp_path / f"case-{case}.yaml"
        path.write_bytes(content)
        status, out, err = _validate(path)
        where = f"seed {seed}, case {case} ({mutate.__name__}): {content[:120]!r}"
        assert status in outcomes, f"{where}: exit {status}: {err.strip()[:400]}"
        assert "Traceback" not in out + err, where
        if status == 0:
            assert out.strip() == f"{path}: OK" and err == "", where
        else:
            lines = err.strip().splitlines()
            assert lines and all(line.startswith("testbed: error: ") for line in lines), f"{where}: {err[:400]}"
            assert all(len(line) < 8000 for line in lines), f"{where}: a message of {max(map(len, lines))} chars"
        outcomes[status] += 1
    assert outcomes[2] > CASES_PER_SEED // 2, outcomes  # most mutations break the file, and are reported


def test_an_unexpected_error_is_one_line_with_a_debug_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(SMALL, encoding="utf-8")

    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr("testbed.config.load.validate", broken)
    status, out, err = _validate(path)
    assert status == 1 and out == ""
    expected = "RuntimeError: disk on fire second line (run with --debug for the traceback)"
    assert err == f"testbed: unexpected error: {expected}\n"
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["--debug", "validate", str(path)])


def test_usage_mistakes_are_one_line_exit_2() -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
        main(["frobnicate"])
    assert stop.value.code == 2
    assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("testbed: error: argument COMMAND")
