"""User-facing errors and the command-line wrapper that reports them.

A :class:`UserError` is a mistake the user can fix (a wrong path, a bad flag,
a broken file).  The scripts run their ``main`` through :func:`run_cli`, which
turns such an error into ONE line on stderr and a non-zero exit status, with no
traceback.  Programming errors still surface with their full traceback.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Callable, Optional, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# Ctrl-C while the interpreter runs a finalizer (a ``__del__``, e.g. a progress bar's, or a weakref
# callback) raises KeyboardInterrupt inside it, and Python prints and drops it ("Exception ignored in
# ..."): the press was lost.  The handler below records every press, and the loops re-raise a recorded
# one at their next step (:func:`check_interrupted`, called by :func:`utils.stages.staged`).
_pressed = False


def _on_interrupt(signum, frame) -> None:
    global _pressed
    _pressed = True
    raise KeyboardInterrupt


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed and its first KeyboardInterrupt was dropped."""
    if _pressed:
        raise KeyboardInterrupt


class UserError(Exception):
    """An error caused by the input (paths, files, flags), with a one-line message.

    The message must name the offending path or flag and say what to do.

    When a DataLoader worker raises a ``UserError``, PyTorch re-raises it in the
    main process as ``UserError(<whole worker traceback>)``; the constructor
    recovers the original one-line message from that text.
    """

    def __init__(self, message: str = ""):
        message = str(message)
        if "Original Traceback" in message:
            marker = f"{type(self).__name__}: "
            tail = [line for line in message.strip().splitlines() if marker in line]
            if tail:
                message = tail[-1].split(marker, 1)[1]
        super().__init__(" ".join(message.split()) if "\n" in message else message)


def run_cli(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> int:
    """Run a script's ``main(argv)``; report user errors and Ctrl-C in one line."""
    from utils import distributed   # the one process group of a torchrun job, left at the end

    global _pressed
    _pressed = False
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_interrupt) if main_thread else None
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint and result files are intact; "
              "continue with --resume", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        distributed.shutdown()
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    return 0
