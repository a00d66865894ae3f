"""What fastsal was built against, and a guard against two different libcaffe copies in one process."""

from __future__ import annotations

import os

from . import _core


def build_info() -> dict:
    """The Caffe fastsal was built against: version, BLAS, CUDA/cuDNN, and the libcaffe file loaded."""
    return dict(_core.build_info())


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
