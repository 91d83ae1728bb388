"""Progress on stderr, drawn by `rich`, and one-line warnings.

Two shapes of progress share one display:
- `phase(label, total)` / `advance(n)` / `tick()`: one step at a time (load,
  save, commit), a single bar that the next phase replaces;
- `task(label, total)`: one line per transfer running side by side (layers
  of a push or pull), each with bytes and rate; `Task.done(status)` leaves a
  plain line ("label: status").

Bars are drawn only when stderr is a terminal and the user did not pass -q.
Off a terminal a task still prints its one `done` line (unless -q); phases
print nothing. Warnings are always printed (they report something the user
should know). Every method is safe to call from several threads.
"""

from __future__ import annotations

import sys
import threading

_REFRESH_PER_SECOND = 8


class Progress:
    def __init__(self, quiet: bool = False, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.enabled = not quiet and _isatty(self.stream)
        self._bars = None        # rich.progress.Progress, while bars are drawn
        self._phase = None       # its task id for the current phase
        self._lock = threading.Lock()

    # -- one step at a time ----------------------------------------------------

    def phase(self, label: str, total: int | None = None):
        """Start a new step ("load layer sha256:ab12… (2/5)"), `total` bytes if known."""
        bars = self._start()
        if bars is None:
            return
        with self._lock:
            if self._phase is not None:
                bars.remove_task(self._phase)
            self._phase = bars.add_task(label, total=total)

    def advance(self, nbytes: int):
        if self._phase is not None:
            self._bars.advance(self._phase, nbytes)

    def tick(self, n: int = 1):
        pass                     # entry counts are not shown; bytes tell the progress

    # -- transfers side by side ------------------------------------------------

    def task(self, label: str, total: int | None = None) -> "Task":
        bars = self._start()
        return Task(self, label, bars.add_task(label, total=total) if bars else None)

    def line(self, text: str):
        """A plain line (not with -q), printed above any bars."""
        if self.quiet:
            return
        if self._bars is not None:
            self._bars.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    # -- end -------------------------------------------------------------------

    def finish(self):
        """Take the bars off the screen (idempotent)."""
        with self._lock:
            bars, self._bars, self._phase = self._bars, None, None
        if bars is not None:
            bars.stop()

    def warn(self, message: str):
        text = f"unionfs: warning: {message}"
        if self._bars is not None:
            self._bars.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def _start(self):
        """The bars (started on first use), or None when none are drawn."""
        if not self.enabled:
            return None
        # rich is imported only to draw: every command imports this module.
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn
        from rich.progress import Progress as _Bars
        with self._lock:
            if self._bars is None:
                console = Console(file=self.stream, force_terminal=True, highlight=False)
                self._bars = _Bars(TextColumn("{task.description}"), BarColumn(),
                                   DownloadColumn(binary_units=True), TransferSpeedColumn(),
                                   console=console, transient=True,
                                   refresh_per_second=_REFRESH_PER_SECOND)
                self._bars.start()
            return self._bars


class Task:
    """One transfer's line; duck-types as a Progress for the readers below it."""

    def __init__(self, progress: Progress, label: str, task_id):
        self._progress, self.label, self._id = progress, label, task_id

    def advance(self, nbytes: int):
        if self._id is not None and self._progress._bars is not None:
            self._progress._bars.advance(self._id, nbytes)

    def tick(self, n: int = 1):
        pass

    def reset(self):
        """Start over (a retried transfer)."""
        if self._id is not None and self._progress._bars is not None:
            self._progress._bars.reset(self._id)

    def warn(self, message: str):
        self._progress.warn(message)

    def done(self, status: str):
        bars = self._progress._bars
        if self._id is not None and bars is not None:
            bars.remove_task(self._id)
            bars.refresh()       # else the line below is drawn over the bars as they were
        self._progress.line(f"{self.label}: {status}")


def size_text(n: int) -> str:
    """1536 -> '1.5 KiB', as the done lines show sizes."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


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
