"""Stage marks: production code names its stages, a profiler may listen.

The evaluation and training code wraps its steps in ``with stage("matching"):``
and friends.  Without a listener a mark costs one global lookup; with one
(:func:`listening`, used by ``benchmarks/``) the listener's context manager
runs around the stage, so a benchmark times and counts the real code path
without replacing any of its functions.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterable, Iterator, Optional, TypeVar

from utils.errors import check_interrupted

T = TypeVar("T")
Listener = Callable[[str], ContextManager]

_listener: Optional[Listener] = None


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark the code inside as the stage ``name`` (a no-op unless a listener is installed)."""
    if _listener is None:
        yield
        return
    with _listener(name):
        yield


def staged(iterable: Iterable[T], name: str) -> Iterator[T]:
    """``iterable`` with every ``next`` marked as the stage ``name`` (e.g. loading a batch); a Ctrl-C whose
    KeyboardInterrupt a finalizer dropped is raised again here (:func:`utils.errors.check_interrupted`)."""
    iterator = iter(iterable)
    while True:
        check_interrupted()
        with stage(name):
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield item


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Within: every stage mark runs inside ``listener(name)``."""
    global _listener
    previous, _listener = _listener, listener
    try:
        yield
    finally:
        _listener = previous
