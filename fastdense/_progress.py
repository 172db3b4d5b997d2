"""The one-line progress bar of the demo's checks and of the trainers.

On a terminal the bar is redrawn in place. Into a pipe or a file (CI logs,
``make demo | tee log``) every carriage-return redraw would stay in the log, so
there the bar writes a plain line at most every ``interval`` seconds, and the
last one.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


class ProgressBar:
    """``[#####.....] done/total label``.

    ``done_label`` replaces the label of the final line written into a pipe
    (None keeps the last step's, e.g. the final loss). ``use_tqdm`` draws the
    terminal bar with tqdm when it is installed (it is not a dependency).
    """

    def __init__(self, total: int, width: int = 30, stream: TextIO | None = None, *, initial: int = 0,
                 enabled: bool = True, interval: float = 5.0, done_label: str | None = "done",
                 use_tqdm: bool = False, clock: Callable[[], float] = time.monotonic):
        self.total = max(1, total)
        self.width = width
        # sys.stdout is looked up now, not at import: tests and notebooks replace it.
        self.stream = stream if stream is not None else sys.stdout
        self.done = initial
        self.enabled = enabled
        self.interval = interval
        self.done_label = done_label
        self.clock = clock
        self.interactive = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_line = clock()
        self._open_line = False  # a redrawn line that still needs its newline
        self._tqdm = None
        if self.interactive and use_tqdm:
            try:
                from tqdm import tqdm

                self._tqdm = tqdm(total=total, initial=initial, file=self.stream, dynamic_ncols=True, leave=True)
            except ImportError:
                pass

    def render(self, label: str = "") -> str:
        filled = self.width * min(self.done, self.total) // self.total
        bar = "#" * filled + "." * (self.width - filled)
        return f"[{bar}] {self.done}/{self.total} {label}".rstrip()

    def step(self, label: str = "") -> None:
        self.done = min(self.total, self.done + 1)
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(label, refresh=False)
            self._tqdm.update(1)
            return
        last = self.done == self.total
        if self.interactive:
            self.stream.write("\r\033[K" + self.render(label) + ("\n" if last else ""))
            self._open_line = not last
        elif last:
            self.stream.write(self.render(label if self.done_label is None else self.done_label) + "\n")
        elif self.clock() - self._last_line >= self.interval:
            self.stream.write(self.render(label) + "\n")
            self._last_line = self.clock()
        else:
            return
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line on a terminal if it stopped before ``total`` (e.g. ``fit(until=...)``)."""
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False
