"""What a user sees while a job runs: one compact pagemill progress line, not Ray's noise.

On a healthy run Ray prints lines that read like errors to a user (token-auth notices, the
progress-UI hint, per-operator progress logs). `quiet_ray_init` / `quiet_ray_data` silence those on
the console only (Ray's log files keep everything); `Progress` draws items done / listed, pages/s,
errors and an ETA on stderr when it is a terminal.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from itertools import islice
from typing import Iterator, TextIO

_QUIET_LOGGERS = {
    "ray._private.authentication.authentication_token_setup": logging.ERROR,  # "token auth is enabled", "generated token"
    "ray._private.worker": logging.WARNING,  # "Started a local Ray instance"
}


@contextmanager
def quiet_ray_init() -> Iterator[None]:
    """Around `ray.init`: no token-auth notices or "started a local Ray" lines on the console.

    The one line left is the C++ "constructor arguments in the object store and max_restarts > 0"
    warning of Ray's core worker, which no Python setting reaches; the README explains it (harmless:
    the driver keeps those arguments referenced for the whole run).
    """
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    yield


def quiet_ray_data() -> None:
    """Ray Data's own console output: errors only; its log file (session logs/ray-data) stays complete."""
    import ray.data  # noqa: F401 - configures the "ray.data" logger
    from ray.util.debug import log_once

    ctx = ray.data.DataContext.get_current()
    with warnings.catch_warnings():  # any DataContext assignment re-warns about Ray's own deprecated fields
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.enable_progress_bars = False  # replaced by our line; Ray would warn that it is off, once:
    log_once("ray_data_progress_manager_disabled")
    for h in logging.getLogger("ray.data").handlers:
        if not isinstance(h, logging.FileHandler):
            h.setLevel(logging.WARNING)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """`update(...)` at most every `every` seconds; counts the source listing in a background thread."""

    def __init__(self, job: str, listing: Iterator | None = None, *, stream: TextIO | None = None,
                 enabled: bool | None = None, every: float = 0.5, limit: int | None = None) -> None:
        self.job = job
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.every = every
        self.listed: int | None = None
        self._listing_done = False
        self._t0 = time.monotonic()
        self._last = 0.0
        self._width = 0
        if self.enabled and listing is not None:
            threading.Thread(target=self._count, args=(islice(listing, limit),), daemon=True).start()

    def _count(self, listing: Iterator) -> None:
        n = 0
        try:
            for _ in listing:
                n += 1
                if n % 1000 == 0:
                    self.listed = n
        except Exception:  # noqa: BLE001 - the pipeline reports listing errors itself
            return
        self.listed, self._listing_done = n, True

    def line(self, done: int, pages: int, errors: int) -> str:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        rate = pages / elapsed
        listed = f"{self.listed}" if self._listing_done else (f"{self.listed}+" if self.listed else "?")
        eta = None
        if self._listing_done and done and self.listed is not None:
            eta = max(self.listed - done, 0) * elapsed / done
        return (f"pagemill {self.job}: {done}/{listed} items · {rate:.2f} pages/s · {errors} error(s) · "
                f"ETA {_eta(eta)}")

    def update(self, done: int, pages: int, errors: int, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        text = self.line(done, pages, errors)
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()
