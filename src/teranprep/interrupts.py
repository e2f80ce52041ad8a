"""SIGINT and SIGTERM in long stages: stop quietly, keep what is done, say what was kept and how to resume.

The CLI turns both signals into `Interrupted` (a BaseException, so no `except Exception` in a
stage swallows it); a stage wraps its long part in `resumable(describe_kept)`, and the CLI prints
one line from the innermost description plus the command that resumes, then exits 130 (SIGINT)
or 143 (SIGTERM).
"""

from __future__ import annotations

import shlex
import signal
import sys
from contextlib import contextmanager
from typing import Callable

_kept_descriptions: list[Callable[[], str]] = []


class Interrupted(BaseException):
    """Raised in the main thread when SIGINT or SIGTERM arrives."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_undelivered: list[int] = []  # a signal whose Interrupted no `resumable` has seen yet


def _raise_interrupted(signum, frame):
    # The handler runs at whatever bytecode the main thread is at; inside a weakref callback or a
    # __del__ the exception cannot propagate (_quiet_unraisable keeps it from being printed), so
    # the signal is also kept here for check_interrupted() (called between items) to raise again.
    _undelivered.append(signum)
    raise Interrupted(signum)


def check_interrupted() -> None:
    """Raises the Interrupted that an earlier signal could not deliver (see _raise_interrupted)."""
    if _undelivered:
        raise Interrupted(_undelivered[-1])


def _quiet_unraisable(unraisable) -> None:
    """sys.unraisablehook while the handlers are installed. An Interrupted raised inside a weakref
    callback or a __del__ cannot propagate, and Python would print it as "Exception ignored ...
    Traceback". It is not printed (a user sees one line, never a traceback): the signal is in
    _undelivered, and check_interrupted() between items raises it again. (Sending the signal
    again from here would run its handler inside this hook.) Anything else goes to the hook that
    was there before."""
    if isinstance(unraisable.exc_value, Interrupted):
        return
    _previous_unraisablehook(unraisable)


_previous_unraisablehook = sys.unraisablehook


def install_signal_handlers() -> dict:
    """SIGINT and SIGTERM raise Interrupted in the main thread; returns the handlers replaced."""
    global _previous_unraisablehook
    if sys.unraisablehook is not _quiet_unraisable:
        _previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = _quiet_unraisable
    before = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                before[signum] = signal.signal(signum, _raise_interrupted)
        except ValueError:  # not the main thread
            pass
    return before


def restore_signal_handlers(before: dict) -> None:
    if sys.unraisablehook is _quiet_unraisable:
        sys.unraisablehook = _previous_unraisablehook
    for signum, handler in before.items():
        try:
            signal.signal(signum, handler)
        except (ValueError, TypeError):
            pass


@contextmanager
def resumable(describe_kept: Callable[[], str]):
    """While inside, an interrupt reports `describe_kept()` (e.g. "12 of 16 shards complete in OUT")."""
    _kept_descriptions.append(describe_kept)
    try:
        yield
    except (Interrupted, KeyboardInterrupt) as exc:
        _undelivered.clear()  # delivered
        if not hasattr(exc, "kept"):  # the innermost stage describes what it kept, now
            try:
                exc.kept = describe_kept()
            except Exception:  # noqa: BLE001 - a report must never hide the interrupt itself
                exc.kept = "completed work was kept"
        raise
    finally:
        _kept_descriptions.pop()


def interrupted_message(exc: BaseException) -> tuple[str, int]:
    """The one line to print for an interrupt, and the exit code (130 SIGINT, 143 SIGTERM)."""
    signum = getattr(exc, "signum", signal.SIGINT)
    kept = getattr(exc, "kept", "nothing was completed yet")
    command = "prep " + shlex.join(sys.argv[1:])
    return (f"interrupted ({signal.Signals(signum).name}): {kept}; resume with: {command}",
            128 + int(signum))


@contextmanager
def signals_ignored_in_children():
    """Processes started inside inherit SIGINT ignored (Python keeps an inherited SIG_IGN), so a
    Ctrl-C sent to the whole terminal group reaches only the driver, which stops them quietly."""
    try:
        before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to arrange
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


class DeferredInterrupts:
    """Inside `with DeferredInterrupts() as pending:`, SIGINT and SIGTERM only set a flag, and
    `pending.check()` raises Interrupted at a point the caller chose (between training steps), so
    an interrupt never leaves a half-applied optimizer step behind."""

    def __init__(self):
        self.signum = None
        self._before = {}

    def _note(self, signum, frame):
        self.signum = signum

    def __enter__(self):
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._before[signum] = signal.signal(signum, self._note)
        except ValueError:  # not the main thread: signals stay as they are
            self._before = {}
        return self

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    def __exit__(self, *exc):
        for signum, handler in self._before.items():
            signal.signal(signum, handler)
        return False
