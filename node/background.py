"""One background thread with a stop flag and a wake-up event.

The assembler, the dispatcher and each worker poll the database on an interval but can be woken
early (an association was released, a job was enqueued, a report is ready); stopping sets both
events so a sleeping thread notices at once.
"""

from __future__ import annotations

import threading


class BackgroundLoop:
    """Subclasses implement `_run`, which loops until `self._stop` is set."""

    def __init__(self, name: str, wake: threading.Event | None = None) -> None:
        self._name = name
        self._stop = threading.Event()
        self._wake = wake or threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def wake(self, *_: object) -> None:
        """Look now instead of at the next poll (usable directly as an event callback)."""
        self._wake.set()

    def _signal_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        self._signal_stop()
        self._join(timeout)

    def _run(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class DrainLoop(BackgroundLoop):
    """A loop that drains an outbox: `tick()` does one pass and returns how much it did; an
    empty pass sleeps `poll_s` (or until woken), a failing pass is logged and the loop goes on."""

    def __init__(self, name: str, poll_s: float = 0.5) -> None:
        super().__init__(name)
        self.poll_s = poll_s

    def tick(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _run(self) -> None:
        from common.log import get_logger

        log = get_logger(f"node.{self._name}")
        while not self._stop.is_set():
            try:
                n = self.tick()
            except Exception:  # noqa: BLE001 - keep draining whatever one pass did
                log.exception(f"{self._name} pass failed")
                n = 0
            if n == 0:
                self._wake.wait(self.poll_s)
                self._wake.clear()
