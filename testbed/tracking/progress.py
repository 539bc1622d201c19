"""Progress of long work: a bar on a terminal, plain log lines otherwise (CI, files)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    """Reports rounds done, time left and the last accuracy; quiet when ``enabled`` is False."""

    def __init__(
        self, total: int, label: str, *, enabled: bool = True, stream: TextIO | None = None, unit: str = "round"
    ) -> None:
        self.total = total
        self.unit = unit
        self.label = label
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self._bar: Any = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit=unit, file=self.stream, dynamic_ncols=True)

    def resize(self, total: int) -> None:
        """Change the number of steps expected (work that grows or shrinks as it runs)."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def start_at(self, done: int) -> None:
        """Mark ``done`` steps as already complete (a resumed run)."""
        if self._bar is not None:
            self._bar.update(done)

    def update(self, step: int, info: dict[str, float]) -> None:
        """Report that step ``step`` (1-based) finished with the given figures."""
        if not self.enabled:
            return
        shown = {key: f"{value:.4g}" for key, value in info.items()}
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)
            return
        elapsed = time.monotonic() - self.started
        fields = " ".join(f"{key}={value}" for key, value in shown.items())
        print(
            f"[{self.label}] {self.unit} {step}/{self.total} {fields} elapsed={elapsed:.1f}s",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()
