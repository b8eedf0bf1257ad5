"""Progress of long work for a person at a terminal: one line on stderr, rewritten in place.

Nothing at all is written when stderr is not a terminal, so logs, pipes and CI get no noise.
"""

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

REDRAW_SECONDS = 0.2  # a terminal redrawn more often only flickers


class Progress:
    """``label: done/total`` (or ``label: done``) while the work goes on, then the time it took."""

    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = None):
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.shown = self.stream.isatty()
        self.done = 0
        self.started = time.monotonic()
        self._drawn_at = float("-inf")  # the first update is drawn at once

    def update(self, done: int) -> None:
        """``done`` units of the work finished so far."""
        self.done = done
        now = time.monotonic()
        if self.shown and now - self._drawn_at >= REDRAW_SECONDS:
            self._drawn_at = now
            self._draw("")

    def _draw(self, end: str) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        share = f" ({100 * self.done // self.total}%)" if self.total else ""
        took = f" in {time.monotonic() - self.started:.1f} s" if end else ""
        self.stream.write(f"\r\x1b[2K{self.label}: {self.done}{of}{share}{took}{end}")
        self.stream.flush()

    def finish(self) -> None:
        if self.shown:
            self._draw("\n")


@contextmanager
def progress(label: str, total: int | None = None, stream: TextIO | None = None) -> Iterator[Progress]:
    shown = Progress(label, total, stream)
    try:
        yield shown
    finally:
        shown.finish()
