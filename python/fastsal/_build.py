"""What fastsal was built against and the kernels this CPU gets, and a guard against two different
libcaffe copies in one process."""

from __future__ import annotations

import os
import sys
import warnings

from . import _core


def build_info() -> dict:
    """The Caffe fastsal was built against (version, BLAS, CUDA/cuDNN, the libcaffe file loaded) and the
    kernels this CPU gets: ``openblas_core`` (OpenBLAS's choice, None with another BLAS), ``onednn_isa``
    (oneDNN's), ``inexact_backward`` and ``perturbation_forward`` (the inexact mode's convolution
    backward, and the perturbation methods' inexact forward: ``"bf16"`` where the CPU has AMX, else
    ``"fp32"``); and how
    fastsal's threads behave here: ``threads`` (the default count) and ``omp_wait`` (how idle OpenMP
    threads wait: fastsal bounds libgomp's spinning unless you set a policy)."""
    from . import _threads

    try:
        threads = _threads.default_threads()
    except ValueError as error:  # a malformed FASTSAL_NUM_THREADS: say so, this is where one looks
        threads = str(error)
    return {**_core.build_info(), "threads": threads, "omp_wait": _threads.wait_policy}


class SlowBlasWarning(UserWarning):
    """Caffe's OpenBLAS runs its generic kernels on this CPU: Caffe's forward, and so fastsal's exact
    mode, runs several times slower than the CPU allows."""


# OpenBLAS's pre-AVX cores: what its DYNAMIC_ARCH build falls back to on a model its version does not know.
_GENERIC_CORES = {"Prescott", "Core2", "Penryn", "Dunnington", "Nehalem", "Atom", "Katmai", "Northwood"}


def slow_blas_advice(core: str | None, cpu_flags: set[str]) -> str | None:
    """What to do when OpenBLAS picked generic kernels for a CPU that has AVX2 or AVX-512; None when not."""
    if core not in _GENERIC_CORES:
        return None
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= cpu_flags:
        isa, better = "AVX-512", "SkylakeX"
    elif {"avx2", "fma"} <= cpu_flags:
        isa, better = "AVX2", "Haswell"
    else:
        return None
    return (
        f"Caffe's OpenBLAS runs its generic {core} kernels on this CPU, which has {isa} (that OpenBLAS "
        "version does not know the CPU model): Caffe's forward, and so fastsal's exact mode and pycaffe "
        f"itself, run 2-3x slower than they could. Start Python with OPENBLAS_CORETYPE={better} in the "
        "environment (OpenBLAS reads it when it loads), or use exact=False, whose oneDNN kernels are unaffected."
    )


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_blas_checked = False


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by fastsal's caller name the first line outside
    fastsal (fastsal.compute, attribute and evaluate reach the engine through several layers of it)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def warn_if_blas_is_slow() -> None:
    """Once per process, a SlowBlasWarning when Caffe's forward runs on OpenBLAS's generic kernels."""
    global _blas_checked
    if _blas_checked:
        return
    _blas_checked = True
    advice = slow_blas_advice(_core.build_info()["openblas_core"], _cpu_flags())
    if advice:
        warnings.warn(advice, SlowBlasWarning, stacklevel=user_stacklevel())


def has_cuda() -> bool:
    """True when fastsal and its Caffe were built with CUDA (a GPU is still needed to use it)."""
    return bool(_core.build_info()["cuda"])


def cuda_device_count() -> int:
    """CUDA devices fastsal can use: 0 without a CUDA build, or without a GPU."""
    return int(_core.cuda_device_count())


def set_caffe_log_level(level: int) -> None:
    """Caffe's (glog's) minimum log level from now on: 0 INFO (Caffe's default), 1 WARNING, 2 ERROR.

    Setting GLOG_minloglevel only works before ``import caffe``; this works at any time."""
    if level not in (0, 1, 2, 3):
        raise ValueError(f"level must be 0 (INFO), 1 (WARNING), 2 (ERROR) or 3 (FATAL), got {level!r}")
    _core.set_log_level(level)


def _loaded_libcaffe_files() -> set[str]:
    try:
        with open("/proc/self/maps") as maps:
            return {os.path.realpath(line.split()[-1]) for line in maps if "/libcaffe.so" in line}
    except OSError:  # not Linux: nothing to check
        return set()


def _check_single_libcaffe() -> None:
    files = _loaded_libcaffe_files()
    if len(files) > 1:
        raise ImportError(
            "two different libcaffe libraries are loaded: " + ", ".join(sorted(files)) + ". pycaffe and "
            "fastsal must use the same Caffe build; rebuild fastsal against the Caffe that `import caffe` "
            "loads (see README: bring your own Caffe)."
        )


_check_single_libcaffe()
