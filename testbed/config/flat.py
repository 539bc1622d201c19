"""A configuration as the flat ``dotted.key -> text`` parameters a run logs to MLflow.

The schema checks these keys against MLflow's rules before a run starts; the tracker logs them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

MAX_PARAM_LENGTH = 6000


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested config data to dotted keys; client groups are keyed by their group name."""
    items: dict[str, str] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            items.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(data, list) and data and all(isinstance(item, Mapping) and "group" in item for item in data):
        for item in data:
            rest = {key: value for key, value in item.items() if key != "group"}
            items.update(flatten(rest, f"{prefix}{item['group']}."))
    else:
        text = json.dumps(data) if isinstance(data, list | dict) else str(data)
        items[prefix.rstrip(".")] = text[:MAX_PARAM_LENGTH]
    return items
