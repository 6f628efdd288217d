"""Where a model is loaded and in what precision: ``--device`` and ``--dtype`` checked before any model time is spent.

``cpu``, ``cuda``, ``cuda:N`` or ``auto``: ``auto`` takes the GPUs when there
are any (accelerate's ``device_map="auto"``, which spreads a model that does
not fit one GPU over all of them) and the CPU otherwise. A device this
machine does not have, or a precision the device cannot compute in, is one
:class:`PlacementError` naming what to pass instead.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"


class PlacementError(ValueError):
    """A device or dtype that cannot be used here; the message says what to pass instead."""


@dataclass(frozen=True)
class Placement:
    """A checked device and dtype; ``device_map`` is set when accelerate places the model (``auto`` on GPUs)."""

    device: str
    dtype: torch.dtype
    device_map: str | None = None

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def dtype_of(name: str | torch.dtype) -> torch.dtype:
    """``float32``/``bfloat16``/``float16`` (or fp32/bf16/fp16) as a torch dtype; anything else is refused."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise PlacementError(f"dtype {name} is not supported; use float32, bfloat16 or float16")
        return name
    key = DTYPE_ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in DTYPES:
        raise PlacementError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return DTYPES[key]


def resolve_placement(device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32") -> Placement:
    """Check ``device`` and ``dtype`` against this machine; the returned placement is what loading uses."""
    chosen = dtype_of(dtype)
    text = str(device).strip().lower()
    if text == "auto":
        if not torch.cuda.is_available():
            return Placement("cpu", chosen)
        _check_cuda_dtype(chosen, 0)
        if importlib.util.find_spec("accelerate") is None:
            raise PlacementError("--device auto spreads the model over the GPUs with accelerate, which is not installed; "
                                 "pip install accelerate, or pass --device cuda")
        return Placement("cuda", chosen, device_map="auto")
    if text == "cpu":
        return Placement("cpu", chosen)
    if text == "cuda" or text.startswith("cuda:"):
        index = _cuda_index(text)
        _check_cuda_dtype(chosen, index)
        return Placement(text if text != "cuda" else "cuda:0", chosen)
    raise PlacementError(f"unknown device {device!r}; use {DEVICE_CHOICES}")


def _cuda_index(text: str) -> int:
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise PlacementError(f"--device {text}: this machine has no usable CUDA device (torch {torch.__version__} is "
                             f"{build}); pass --device cpu, or install a CUDA build of torch on a machine with a GPU")
    _, _, number = text.partition(":")
    if number and not number.isdigit():
        raise PlacementError(f"--device {text}: the GPU index must be a number, e.g. cuda:0")
    index = int(number or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise PlacementError(f"--device {text}: this machine has {count} GPU(s), numbered 0..{count - 1}")
    return index


def _check_cuda_dtype(dtype: torch.dtype, index: int) -> None:
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(index)
        raise PlacementError(f"--dtype bfloat16: {name} cannot compute in bfloat16 (it needs compute capability 8.0 "
                             "or newer); pass --dtype float16 or float32")


def peak_memory_bytes() -> dict[str, int]:
    """Peak memory so far: the process's peak resident set (CPU) and, on CUDA, the allocator's peak over all GPUs."""
    peaks = {"cpu_peak_rss_bytes": _peak_rss()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["cuda_peak_allocated_bytes"] = int(sum(torch.cuda.max_memory_allocated(i)
                                                     for i in range(torch.cuda.device_count())))
    return peaks


def _peak_rss() -> int:
    """Linux's VmHWM, which starts again at exec; ``ru_maxrss`` survives exec, so a run started from a large
    process (a test runner, a notebook) would report that process's peak. Elsewhere ``ru_maxrss``."""
    import resource
    import sys

    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
