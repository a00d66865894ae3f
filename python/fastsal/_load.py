"""fastsal.load: open a deploy net safely. Caffe answers a bad prototxt or weights file with a glog CHECK,
which aborts the process, so the files are first opened in a throwaway child process."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import caffe

_TRIAL = "import sys, caffe; caffe.Net(sys.argv[1], caffe.TEST, **({'weights': sys.argv[2]} if len(sys.argv) > 2 else {}))"
# glog's fatal lines ("F20261125 06:12:01.123 123 net.cpp:84] Check failed: ..."; older glogs omit the
# year) and protobuf's parse errors.
_REASON = re.compile(r"^(?:F(?:\d{4}){1,2} [\d:.]+\s+\d+ \S+\] (.*)|.*(Error parsing text-format.*))$")


def load(
    prototxt: str | os.PathLike, weights: str | os.PathLike | None = None, *, validate: bool = True
) -> caffe.Net:
    """A ``caffe.Net`` in TEST phase from a deploy prototxt and optional trained weights.

    Unlike ``caffe.Net(...)``, a missing, malformed or inconsistent file raises instead of aborting
    the interpreter: FileNotFoundError for a missing file, ValueError with Caffe's own reason for a
    prototxt that does not parse or describe a valid net, and for weights that are truncated or do
    not fit the net. The check builds the net once in a child process (``validate=False`` skips it).
    """
    paths = [os.fspath(prototxt)] + ([os.fspath(weights)] if weights is not None else [])
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path}")
        if not os.access(path, os.R_OK):
            raise PermissionError(f"cannot read {path}")
    if validate:
        env = dict(os.environ, GLOG_minloglevel="2", GLOG_logtostderr="1")
        trial = subprocess.run(
            [sys.executable, "-c", _TRIAL, *paths], capture_output=True, text=True, env=env
        )
        if trial.returncode != 0:
            raise ValueError(f"Caffe cannot load {' with '.join(paths)}: {_reason(trial.stderr)}")
    if weights is None:
        return caffe.Net(paths[0], caffe.TEST)
    return caffe.Net(paths[0], caffe.TEST, weights=paths[1])


def _reason(stderr: str) -> str:
    reasons = [next(g for g in m.groups() if g) for m in map(_REASON.match, stderr.splitlines()) if m]
    if reasons:
        return "; ".join(dict.fromkeys(r.strip() for r in reasons))
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "the trial process failed without a message"
