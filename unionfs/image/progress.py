"""Progress lines on a terminal (stderr) and one-line warnings.

Progress is drawn only when stderr is a tty and the user did not pass -q;
warnings are always printed (they report something the user should know).
"""

from __future__ import annotations

import sys
import time

_MIN_INTERVAL = 0.1  # seconds between redraws


class Progress:
    def __init__(self, quiet: bool = False, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = not quiet and _isatty(self.stream)
        self.label = ""
        self.total = None
        self.done_bytes = 0
        self.entries = 0
        self._last_draw = 0.0
        self._drawn = False

    def phase(self, label: str, total: int | None = None):
        """Start a new step ("layer 2/5 sha256:ab12…"), `total` bytes if known."""
        self.label, self.total, self.done_bytes, self.entries = label, total, 0, 0
        self._draw(force=True)

    def advance(self, nbytes: int):
        self.done_bytes += nbytes
        self._draw()

    def tick(self, n: int = 1):
        self.entries += n
        self._draw()

    def finish(self):
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def warn(self, message: str):
        self.finish()
        print(f"unionfs: warning: {message}", file=self.stream, flush=True)

    def _draw(self, force=False):
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < _MIN_INTERVAL:
            return
        self._last_draw = now
        text = f"{self.label}  {_mib(self.done_bytes)}"
        if self.total:
            text += f" / {_mib(self.total)}"
        if self.entries:
            text += f"  {self.entries} entries"
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self._drawn = True


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class CountingReader:
    """Pass reads through, reporting their size to a Progress."""

    def __init__(self, raw, progress: Progress | None):
        self._raw, self._progress = raw, progress

    def read(self, n=-1):
        data = self._raw.read(n)
        if self._progress and data:
            self._progress.advance(len(data))
        return data
