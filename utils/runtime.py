"""Process-level performance settings."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

from utils.errors import UserError

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_cpu_allocator(mmap_threshold: int = 256 * 2 ** 20, trim_threshold: int = 512 * 2 ** 20) -> bool:
    """Let glibc's malloc reuse freed memory for tensors of up to ``mmap_threshold`` bytes.

    By default glibc serves every allocation above 32 MiB (and, before its
    threshold adapts, above 128 KiB) with a fresh ``mmap`` and unmaps it on
    free, so each large CPU tensor costs page faults on first touch.  The
    matching, VQ and flow loops allocate such tensors in every block; keeping
    them in the heap made them about 2x faster on the CPU (benchmarks/eval_speed.py).
    This is what PyTorch's CPU performance guide gets from jemalloc or tcmalloc
    via LD_PRELOAD, done in-process.  A no-op off glibc; returns whether it applied.
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _tuned


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda:N`` is checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def configure_device(device: torch.device) -> None:
    """Per-device speed settings: on CUDA, cuDNN picks the fastest convolution algorithms
    for the (fixed) input sizes.  Matmul precision stays float32 (the flows need it)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
