"""Numeric precision and CPU settings shared by training and scoring.

On a CPU with native bf16 (AVX512-BF16 or AMX-BF16, seen by oneDNN) training
runs in Lightning's ``bf16-mixed`` (``torch.autocast("cpu", torch.bfloat16)``:
weights and optimizer state stay float32) and scoring runs its forward in bf16
autocast; without it both stay in float32. CNNs use the ``channels_last``
memory format, which oneDNN's convolutions prefer. Threads: one per core this
process may run on (``os.sched_getaffinity``), not per core of the machine.
"""

from __future__ import annotations

import functools
import os

__all__ = ["PRECISIONS", "cpu_bf16_supported", "cpu_flags", "resolve_precision", "available_cores", "bf16_autocast",
           "fit_in_run_folder"]

PRECISIONS = ("auto", "bf16-mixed", "32-true")


@functools.lru_cache(maxsize=1)
def cpu_bf16_supported() -> bool:
    """Whether this CPU runs bf16 natively (oneDNN's check for AVX512-BF16/AMX), cached for the process.

    Without native support oneDNN emulates bf16, which is slower than float32,
    so "auto" keeps float32 there.
    """
    import torch

    try:
        onednn = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the mkldnn ops
        return False
    flags = cpu_flags()
    # oneDNN also says yes on plain AVX512 CPUs, where it emulates bf16: require the native instructions
    return onednn and (flags is None or bool(flags & {"avx512_bf16", "amx_bf16"}))


def cpu_flags() -> set | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def resolve_precision(precision: str, *, gpu: bool) -> str:
    """The Lightning precision for a setting: "auto" is ``bf16-mixed`` on a GPU or a bf16 CPU, else ``32-true``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16-mixed" if gpu or cpu_bf16_supported() else "32-true"


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), which a container or ``taskset`` can limit."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def bf16_autocast(device: str, precision: str = "auto"):
    """The autocast context of a forward on ``device``: bf16 on a GPU or a bf16 CPU under "auto", else none."""
    import contextlib

    import torch

    gpu = device.startswith("cuda")
    if resolve_precision(precision, gpu=gpu) != "bf16-mixed":
        return contextlib.nullcontext()
    return torch.autocast("cuda" if gpu else "cpu", dtype=torch.bfloat16)


def fit_in_run_folder(trainer, *args, **kwargs):
    """``trainer.fit(*args, **kwargs)`` without Lightning's warning that the checkpoint folder is not empty.

    Both trainers checkpoint into the folder of their run, which holds the run's other files before the first
    checkpoint (``run.json`` and the logs; a cluster run's bag cache and tables) and the last checkpoint when a run
    resumes: by design, so the warning says nothing wrong. Only that warning is filtered, only around the fit."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        return trainer.fit(*args, **kwargs)
