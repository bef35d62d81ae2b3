"""The one progress printer of oodlab, and where the libraries' logs go (a leaf: it imports
nothing from the package).

Lines go through ``sys.stdout.write`` and are flushed at once, not through ``print``: Ray
Train V2 patches ``print`` in its workers, so a printed worker line would reach the driver
twice, and an unflushed one might reach it only when the worker ends.

oodlab's own lines (progress, tables, results) are on stdout; Ray and MLflow log to stderr,
and both write to whatever ``sys.stderr`` is at the time of each write: their loggers, the
stderr of Ray's workers and actors that the driver prints, MLflow's progress bars. So
:func:`library_logs` rebinds ``sys.stderr`` to a log file and the terminal keeps only
oodlab's lines, while worker lines on stdout (``[oodlab] epoch ...``) still reach it.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

_terminal_err: TextIO | None = None  # the terminal's stderr while library logs go to a file


def progress(message: str, *, source: str | None = None, file: TextIO | None = None) -> None:
    """Write ``[oodlab] message`` (or ``[oodlab <source>] message``) to ``file`` (default
    stdout) and flush."""
    prefix = f"[oodlab {source}]" if source else "[oodlab]"
    file = file or sys.stdout
    file.write(f"{prefix} {message}\n")
    file.flush()


def time_left(elapsed_s: float, done: int, left: int) -> str:
    """A progress line's clock: ``ETA m:ss`` for ``left`` more steps at the mean pace of the
    ``done`` ones so far, or ``took m:ss`` when none is left (``h:mm:ss`` past an hour)."""
    seconds = elapsed_s / max(done, 1) * left if left else elapsed_s
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
    return f"ETA {clock}" if left else f"took {clock}"


def stderr() -> TextIO:
    """The terminal's stderr, also while library logs go to a file: for oodlab's errors."""
    return _terminal_err or sys.stderr


class _LogFile(io.TextIOBase):
    """A text stream that creates ``path`` at its first write and names it once on
    ``fallback``, the terminal's stderr, so stdout stays what the command prints (a job id,
    a table); a command that logs nothing leaves no file, an unwritable path falls back to
    ``fallback``."""

    def __init__(self, path: Path, fallback: TextIO) -> None:
        super().__init__()
        self.path, self._fallback = path, fallback
        self._file: TextIO | None = None
        self._lock = threading.Lock()

    @property
    def encoding(self) -> str:
        return "utf-8"

    def _target(self) -> TextIO:
        with self._lock:
            if self._file is None:
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
                except OSError:
                    self._file = self._fallback
                else:
                    progress(f"Ray and MLflow logs: {self.path} (oodlab -v shows them here)",
                             file=self._fallback)
            return self._file

    def write(self, text: str) -> int:
        return 0 if self.closed else self._target().write(text)

    def flush(self) -> None:
        if self._file is not None and not self.closed:
            self._file.flush()

    def fileno(self) -> int:
        return self._target().fileno()

    def close(self) -> None:
        super().close()  # flushes first
        with self._lock:
            if self._file is not None and self._file is not self._fallback:
                self._file.close()


@contextmanager
def library_logs(log_dir: Path, *, verbose: bool = False) -> Iterator[Path | None]:
    """Inside: what is written to ``sys.stderr`` (Ray's and MLflow's logs, the workers'
    stderr) goes to ``<log_dir>/oodlab-<time>.log``, named on the terminal's stderr at its
    first line; the terminal's stderr stays at :func:`stderr`. MLflow draws no download
    progress bars and Ray's worker prefixes have no colour codes. ``verbose``: nothing
    changes. Yields the log file's path (None when verbose)."""
    global _terminal_err
    if verbose or _terminal_err is not None:
        yield None
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # plain text in the file, plain prefixes here
    log = _LogFile(Path(log_dir) / time.strftime("oodlab-%Y%m%d-%H%M%S.log"), sys.stderr)
    _terminal_err, sys.stderr = sys.stderr, log
    try:
        yield log.path
    finally:
        sys.stderr, _terminal_err = _terminal_err, None
        log.close()
