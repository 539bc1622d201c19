"""Markdown for text read from a tracking store: names and values are data, printed as plain text.

A run name, a group, an experiment or a stored parameter can hold anything (newlines, HTML, markdown
links, table pipes); printed raw into report.md it would change the page. ``text`` escapes it, ``code``
shows it in a code span when that is safe and as escaped text otherwise.
"""

from __future__ import annotations

import re

_MARKDOWN = re.compile(r"([\\`*_\[\]|~])")
_PLAIN_CODE = re.compile(r"[\w.\-:/=,+@ ]*")


def _one_line(value: object) -> str:
    flat = "".join(char if char.isprintable() else " " for char in str(value))
    return " ".join(flat.split())


def text(value: object) -> str:
    """``value`` as one line of literal markdown text: no HTML, no markup, no line breaks, no table pipes."""
    plain = _one_line(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN.sub(r"\\\1", plain)


def code(value: object) -> str:
    """``value`` in a code span when it is plain (letters, digits, ``. - : / = , + @``), else as escaped text."""
    plain = _one_line(value)
    return f"`{plain}`" if plain and _PLAIN_CODE.fullmatch(plain) else text(plain)
