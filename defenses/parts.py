"""What every defence part shares: a name, an optional main parameter, and a plain-data description."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar


class Part:
    """Base of batching strategies, losses and update transforms.

    ``name`` is the registry name; a subclass that does not set one is named by its import path
    ``module:QualifiedName``. ``main_parameter`` names the parameter an inline scalar sets
    (``{clip-l2: 1.0}`` means ``{clip-l2: {norm: 1.0}}``); ``None`` means the part takes no inline value.
    """

    name: ClassVar[str]
    main_parameter: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = f"{cls.__module__}:{cls.__qualname__}"

    def parameters(self) -> dict[str, Any]:
        """The part's constructor parameters and their values (read from same-named attributes)."""
        if dataclasses.is_dataclass(self):
            return {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.init}
        names = [
            name
            for name, parameter in inspect.signature(type(self)).parameters.items()
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        ]
        return {name: getattr(self, name) for name in names if hasattr(self, name)}

    def describe(self) -> dict[str, Any]:
        """Plain data for logging: ``{"name": ..., **parameters}``."""
        return {"name": self.name, **self.parameters()}
