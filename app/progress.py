"""Progress of long commands on stderr: steps done, elapsed time and an estimate of the rest."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _seconds(value: float) -> str:
    value = round(value)
    return f"{value // 60}m{value % 60:02d}s" if value >= 60 else f"{value}s"


class Progress:
    """Call ``update(done)`` with the steps finished so far (0..total). The estimate uses the
    pace since the first finished step, so start-up time does not inflate it. On a terminal one
    line is rewritten in place; otherwise a line is printed at most every ``every`` seconds
    (and for the last step)."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None,
                 every: float = 5.0) -> None:
        self.label, self.total, self.every = label, total, every
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self._first: tuple[int, float] | None = None
        self._done = -1
        self._printed = 0.0

    def update(self, done: int) -> None:
        if done == self._done:
            return
        self._done = done
        now = time.monotonic()
        if self._first is None and done > 0:
            self._first = (done, now)
        line = f"{self.label}: step {done}/{self.total}, {_seconds(now - self.start)} elapsed"
        if self._first is not None and done < self.total and done > self._first[0]:
            pace = (now - self._first[1]) / (done - self._first[0])
            line += f", about {_seconds(pace * (self.total - done))} left"
        last = done >= self.total
        if self.tty:
            self.stream.write("\r" + line.ljust(72) + ("\n" if last else ""))
        elif last or now - self._printed >= self.every:
            self.stream.write(line + "\n")
            self._printed = now
        self.stream.flush()
