"""Per-stage profile shared by the benchmarks: seconds, multiply-accumulates, GMAC/s.

A :class:`StageProfile` times the stages that the production code marks
(``utils.stages.stage``: "matching", "flow L1", "backbone", ...) while it
listens (:meth:`StageProfile.listen`); it replaces no function.  Stages do not
nest: a stage entered inside another one is charged to the outer one.  In
*counting* mode the same marks run under
``torch.utils.flop_counter.FlopCounterMode`` instead of being timed, which counts
the multiply-accumulates of every matrix product and convolution (forward and
backward) analytically from the tensor shapes.
"""
from __future__ import annotations

import contextlib
import resource
import time
from collections import defaultdict
from typing import Callable, Dict, List

import torch
from torch.utils.flop_counter import FlopCounterMode

from utils.stages import listening


def peak_memory_gib() -> float:
    """Peak resident memory of this process (the loader workers are separate processes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def matmul_rate_gmacs(device: torch.device, size: int = 1024, repeats: int = 6) -> float:
    """The machine's dense float32 ``torch.mm`` rate in GMAC/s, measured now (best of ``repeats``)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    sync = _sync_of(device)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return size ** 3 / best / 1e9


def _sync_of(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


class StageProfile:
    """Seconds and multiply-accumulates per named stage."""

    def __init__(self, device: torch.device):
        self.sync = _sync_of(device)
        self.seconds: Dict[str, float] = defaultdict(float)
        self.macs: Dict[str, float] = defaultdict(float)
        self.order: List[str] = []
        self.counting = False
        self.enabled = True
        self._depth = 0

    def listen(self):
        """Within: the production code's stage marks are timed (or counted) by this profile."""
        return listening(self.stage)

    @contextlib.contextmanager
    def stage(self, name: str):
        if not self.enabled or self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        if name not in self.order:
            self.order.append(name)
        self._depth += 1
        try:
            if self.counting:
                # The counter's module tracker needs autograd nodes of the parameters, which
                # torch.inference_mode() (evaluation) does not make: count outside of it, without grad.
                with torch.inference_mode(False), torch.no_grad(), FlopCounterMode(display=False) as counter:
                    yield
                self.macs[name] += counter.get_total_flops() / 2
            else:
                self.sync()
                start = time.perf_counter()
                yield
                self.sync()
                self.seconds[name] += time.perf_counter() - start
        finally:
            self._depth -= 1

    def reset_times(self) -> None:
        self.seconds.clear()

    def table(self, total_s: float, rate_gmacs: float, scale_macs=1.0, title: str = "stage") -> str:
        """The per-stage table: seconds, share, GMAC, GMAC/s and efficiency against ``rate_gmacs``.

        ``scale_macs``: a number, or a function of the stage name, that turns the counted
        multiply-accumulates (of a smaller counting run) into those of the timed run."""
        scale_of = scale_macs if callable(scale_macs) else (lambda name: scale_macs)
        lines = [f"{title:<34s} {'seconds':>8s} {'share':>6s} {'GMAC':>9s} {'GMAC/s':>8s} {'of mm':>6s}"]
        accounted = 0.0
        total_macs = 0.0
        for name in self.order:
            s = self.seconds.get(name, 0.0)
            g = self.macs.get(name, 0.0) * scale_of(name) / 1e9
            accounted += s
            total_macs += g
            rate = g / s if s > 0 and g > 0 else 0.0
            lines.append(f"{name:<34s} {s:8.2f} {100 * s / total_s:5.1f}% {g:9.1f} "
                         + (f"{rate:8.1f} {100 * rate / rate_gmacs:5.1f}%" if rate else f"{'-':>8s} {'-':>6s}"))
        other = total_s - accounted
        lines.append(f"{'other (Python, glue)':<34s} {other:8.2f} {100 * other / total_s:5.1f}%")
        lines.append(f"{'whole run':<34s} {total_s:8.2f} {100.0:5.1f}% {total_macs:9.1f} "
                     f"{total_macs / total_s:8.1f} {100 * total_macs / total_s / rate_gmacs:5.1f}%")
        lines.append(f"dense torch.mm rate measured in this run: {rate_gmacs:.1f} GMAC/s")
        return "\n".join(lines)


def load_average() -> str:
    try:
        with open("/proc/loadavg") as handle:
            return " ".join(handle.read().split()[:3])
    except OSError:
        return "n/a"
