"""SIGTERM/SIGINT during a run: finish the compiled call, save, exit 0 (see :class:`Preemption`)."""

from __future__ import annotations

import jax
import numpy as np


class Preempted(BaseException):
    """Raised by the SIGTERM/SIGINT handler while nothing is left to save (setup, evaluation).

    A ``BaseException`` (like ``KeyboardInterrupt``) so that library code's ``except Exception``
    does not swallow it; :func:`macfw.train.train` turns it into a clean, interrupted return.
    """


_EARLY: list[int] = []  # signals received before train() installed its handler (see note_early)


def note_early(signum: int) -> None:
    """Keep a SIGTERM/SIGINT received during ``macfw.run``'s start-up, before :class:`Preemption` exists:
    its ``Preempted`` may be swallowed where it lands (a gc callback ignores exceptions), and the next
    :class:`Preemption` starts with it received, so the run still stops at its first check."""
    _EARLY.append(int(signum))


class Preemption:
    """SIGTERM/SIGINT handling for the whole of :func:`macfw.train.train`.

    A signal sets a flag. During set-up the flag is checked between phases (workdir, data, init,
    checkpoint restore, compiled-step construction) and the run stops there, exits 0, saving
    nothing (there is nothing new). Inside :meth:`interruptible` blocks (data loading or
    generation, which can take long, and evaluations) a signal raises :class:`Preempted` at once.
    In the training loop the flag makes the loop finish the current dispatch (the first one
    includes compilation), save, wait for the save and exit 0. A second SIGINT there stops at once
    (KeyboardInterrupt), after the last started save is waited for.
    """

    def __init__(self, immediate: bool = False):
        import signal

        self.signal = signal
        self.received: int | None = _EARLY[-1] if _EARLY else None  # one that arrived during start-up
        self.immediate = immediate
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (self.signal.SIGTERM, self.signal.SIGINT):
                self._old[sig] = self.signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        first = self.received is None
        self.received = signum
        if self.immediate:
            raise Preempted(signum)
        if not first and signum == self.signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            self.signal.signal(sig, old)

    def check(self) -> None:
        """Raise :class:`Preempted` if a signal has arrived (a safe point)."""
        if self.received is not None:
            raise Preempted(self.received)

    def interruptible(self):
        """Context: a signal (or one that already arrived) raises :class:`Preempted` at once."""
        import contextlib

        @contextlib.contextmanager
        def block():
            self.immediate = True
            try:
                self.check()
                yield
            finally:
                self.immediate = False

        return block()

    def agreed(self) -> bool:
        """True on every process once any process got a signal (multi-host: all save the same step)."""
        flag = self.received is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.array([flag]))))
        return flag
