"""The one progress line of ``upscale-dataset``: images done of the job, ok / failed, rate and ETA.

On a terminal the line is redrawn in place; when stderr is a pipe or a file a new line is printed at
most every ``interval`` seconds when images finished since the last one, every ``10 * interval``
seconds when none did, and once at the end, so a log stays short. Ray Data's own per-operator bars are
off unless ``--verbose``.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

MIN_RATE_SECONDS = 5.0  # a rate (and ETA) is shown once images have finished over this long


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3700`` -> ``1h01m``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    def __init__(self, total: int, *, stream: TextIO | None = None, enabled: bool = True,
                 interval: float = 30.0) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled and total > 0
        self.tty = self.enabled and self.stream.isatty()
        self.interval = 0.5 if self.tty else interval
        self.start = time.monotonic()
        self.first: float | None = None  # when the first image finished
        self.last_shown = self.start
        self.shown_done = 0  # images done at the last line shown
        self.ok = self.failed = 0
        self.width = 0

    def line(self) -> str:
        done = self.ok + self.failed
        text = f"[{done}/{self.total}] {self.ok} ok, {self.failed} failed"
        elapsed = time.monotonic() - self.start
        since_first = time.monotonic() - self.first if self.first is not None else 0.0
        if done > 1 and since_first >= MIN_RATE_SECONDS:  # the rate after the first image: no start-up
            rate = (done - 1) / since_first
            text += f", {rate:.2f} images/s"
            if done < self.total:
                text += f", ETA {duration((self.total - done) / max(rate, 1e-9))}"
        return text + f", {duration(elapsed)} elapsed"

    def update(self, ok: int, failed: int, *, force: bool = False) -> None:
        if ok + failed > self.ok + self.failed and self.first is None:
            self.first = time.monotonic()
        self.ok, self.failed = ok, failed
        now = time.monotonic()
        wait = self.interval if self.tty or ok + failed > self.shown_done else 10 * self.interval
        if not self.enabled or (not force and now - self.last_shown < wait):
            return
        self.last_shown = now
        self._show()

    def _show(self) -> None:
        self.shown_done = self.ok + self.failed
        text = self.line()
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """The final state; on a terminal, end the redrawn line."""
        if not self.enabled:
            return
        self._show()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
