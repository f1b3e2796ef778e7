"""User-facing errors and the command-line wrapper that reports them.

A :class:`UserError` is a mistake the user can fix (a wrong path, a bad flag,
a broken file).  The scripts run their ``main`` through :func:`run_cli`, which
turns such an error into ONE line on stderr and a non-zero exit status, with no
traceback.  Programming errors still surface with their full traceback.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


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
    return 0
