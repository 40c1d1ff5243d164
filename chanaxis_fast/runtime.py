"""What long runs share: SIGTERM handled like Ctrl-C, checkpoint locations checked before the
work starts, and a schedule that saves every N steps or T seconds, whichever comes first."""

import contextlib
import os
import signal
import threading
import time

from .errors import UserInputError


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM during a long run (what
    schedulers and ``docker stop`` send); like Ctrl-C, the run saves its checkpoint first."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main
    thread instead of killing the process, so ``except BaseException`` handlers can save state.

    Only installed from the main thread and only over the default handler (a handler the user
    installed is left alone); the previous handler is restored on exit.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"received signal {signum} (SIGTERM)")

    handler.chanaxis_interrupt = True  # deferred_interrupts may hold it back
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred_interrupts():
    """Within the block, Ctrl-C (SIGINT with Python's default handler) and SIGTERM under
    :func:`sigterm_as_interrupt` are held back; the first one received is raised when the block
    ends. For short steps that must not be torn half-way (folding a batch into a calibration).

    Only from the main thread, and only over those two handlers (a user's own handler is left
    alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    saved = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        h = signal.getsignal(sig)
        if h is signal.default_int_handler or getattr(h, "chanaxis_interrupt", False):
            saved[sig] = h
            signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, h in saved.items():
            signal.signal(sig, h)
    if pending:
        saved[pending[0]](pending[0], None)  # raises KeyboardInterrupt / Terminated


def check_writable(path, who: str, arg: str = "checkpoint") -> None:
    """Raise :class:`UserInputError` unless a file can be written at ``path``: its folder exists and
    is writable, and ``path`` is not a folder. Checked before any work, so that a long run never
    ends with a result it cannot save."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserInputError(f"{who}: {arg} {path!r} is a folder, not a file path")
    if not os.path.isdir(folder):
        raise UserInputError(f"{who}: {arg} {path!r}: folder {folder!r} does not exist")
    probe = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.probe")
    try:
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserInputError(f"{who}: {arg} {path!r} is not writable ({e.strerror})") from None


class SaveSchedule:
    """When to write a checkpoint: after ``every`` steps or ``seconds`` seconds since the last
    save, whichever comes first (``seconds=None``: steps only)."""

    def __init__(self, every: int, seconds=None, done: int = 0):
        self.every, self.seconds = every, seconds
        self.last_done, self.last_time = done, time.monotonic()

    def due(self, done: int) -> bool:
        """Whether a save is due after ``done`` steps in all."""
        if done <= self.last_done:
            return False
        return (done - self.last_done >= self.every or
                (self.seconds is not None and time.monotonic() - self.last_time >= self.seconds))

    def saved(self, done: int) -> None:
        """Record a save after ``done`` steps."""
        self.last_done, self.last_time = done, time.monotonic()

    def unsaved(self, done: int) -> bool:
        """Whether steps were done since the last save."""
        return done > self.last_done
