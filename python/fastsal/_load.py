"""fastsal.load: open a deploy net safely. Caffe answers a bad prototxt or weights file with a glog CHECK,
which aborts the process, so the files are first opened in a throwaway child process; and it keeps its
initial weights, silently, for every layer the weights file does not name, so that file is read here too."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import warnings

import caffe
import numpy as np

from . import _core

_TRIAL = "import sys, caffe; caffe.Net(sys.argv[1], caffe.TEST, **({'weights': sys.argv[2]} if len(sys.argv) > 2 else {}))"
# glog's fatal lines ("F20261125 06:12:01.123 123 net.cpp:84] Check failed: ..."; older glogs omit the
# year) and protobuf's parse errors.
_REASON = re.compile(r"^(?:F(?:\d{4}){1,2} [\d:.]+\s+\d+ \S+\] (.*)|.*(Error parsing text-format.*))$")


def load(
    prototxt: str | os.PathLike, weights: str | os.PathLike | None = None, *, validate: bool = True
) -> caffe.Net:
    """A ``caffe.Net`` in TEST phase from a deploy prototxt and optional trained weights: a binary
    ``.caffemodel`` (a NetParameter, V1 ``layers`` included) or Caffe's HDF5 weights.

    Unlike ``caffe.Net(...)``, a missing, malformed or inconsistent file raises instead of aborting
    the interpreter: FileNotFoundError for a missing file, ValueError with Caffe's own reason for a
    prototxt that does not parse or describe a valid net, and for weights that are truncated or do
    not fit the net. The check builds the net once in a child process (``validate=False`` skips it).

    The weights are also read in this process, with or without ``validate`` (HDF5 files excepted). A file
    that is no NetParameter, or holds no layers (Caffe reads an empty file, and some text files, as an
    empty one), or fills none of the net's layers with parameters raises ValueError; one that fills only
    some warns with MissingWeightsWarning, naming the layers left with Caffe's initial values. Caffe's
    INFO and WARNING log is silenced while loading, and the log level set back to what it was after.
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
    # After the trial, so that Caffe's own reason comes first for files Caffe refuses itself.
    source = None if weights is None else _weight_layers(paths[1])
    with _quiet_caffe():
        net = caffe.Net(paths[0], caffe.TEST)
        if weights is not None:
            if source is not None:
                _check_weights_fit(net, source, paths[1])
            net.copy_from(paths[1])  # what caffe.Net(..., weights=) does
    return net


class MissingWeightsWarning(UserWarning):
    """A weights file that leaves some of the net's layers with parameters at Caffe's initial values."""


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _is_hdf5(path: str) -> bool:
    """H5Fis_hdf5's test, which Caffe's CopyTrainedLayersFrom makes: the signature at 0, 512, 1024, ..."""
    with open(path, "rb") as f:
        size, offset = os.fstat(f.fileno()).st_size, 0
        while offset + len(_HDF5_SIGNATURE) <= size:
            f.seek(offset)
            if f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                return True
            offset = max(512, 2 * offset)
    return False


def _weight_layers(path: str) -> dict[str, list[tuple[tuple[int, ...], bool, int]]] | None:
    """The layers a weights file holds: name -> (shape, legacy 4-D shape?, number of values) per blob.
    None for HDF5 weights, which Caffe reads without this check."""
    if _is_hdf5(path):
        return None
    param = caffe.proto.caffe_pb2.NetParameter()
    try:
        with open(path, "rb") as f:
            param.ParseFromString(f.read())
    except Exception as error:  # protobuf's DecodeError
        raise ValueError(
            f"{path} is not Caffe weights: it does not parse as a Caffe NetParameter (a binary "
            f".caffemodel), and it is no HDF5 file ({error})"
        ) from None
    # Caffe upgrades V1 `layers`, and V0 ones (a V1 layer wrapping its V0 `layer`), on reading.
    layers = [(layer.name, layer.blobs) for layer in param.layer] + [
        (layer.layer.name, layer.layer.blobs) if layer.HasField("layer") else (layer.name, layer.blobs)
        for layer in param.layers
    ]
    if not layers:
        raise ValueError(
            f"{path} is not Caffe weights: it parses as a NetParameter but holds no layers (as an empty "
            "file does)"
        )
    return {name: [_blob_layout(blob) for blob in blobs] for name, blobs in layers}


def _blob_layout(blob) -> tuple[tuple[int, ...], bool, int]:
    legacy = any(blob.HasField(axis) for axis in ("num", "channels", "height", "width"))
    shape = (blob.num, blob.channels, blob.height, blob.width) if legacy else tuple(blob.shape.dim)
    return shape, legacy, len(blob.double_data) or len(blob.data)


def _check_weights_fit(net: caffe.Net, source: dict, path: str) -> None:
    """Caffe's CopyTrainedLayersFrom checks, which abort the interpreter, as ValueErrors, and what it
    does silently: layers matched by name, the net's other layers keep their initial values."""
    target = {
        name: [tuple(blob.shape) for blob in layer.blobs] for name, layer in zip(net._layer_names, net.layers)
    }
    for name, blobs in source.items():
        if name not in target:
            continue  # Caffe ignores layers the net lacks
        if len(blobs) != len(target[name]):
            raise ValueError(
                f"{path} does not fit the net: layer '{name}' has {len(blobs)} parameter blobs in the "
                f"weights, {len(target[name])} in the net"
            )
        for j, ((shape, legacy, count), theirs) in enumerate(zip(blobs, target[name])):
            # Blob::ShapeEquals: a legacy (num, channels, height, width) counts axes from the end.
            fits = (
                (len(theirs) <= 4 and (1,) * (4 - len(theirs)) + theirs == shape)
                if legacy
                else shape == theirs
            )
            if not fits:
                raise ValueError(
                    f"{path} does not fit the net: param {j} of layer '{name}' has shape {shape} in the "
                    f"weights, {theirs} in the net"
                )
            if count != int(np.prod(theirs)):
                raise ValueError(
                    f"{path} is broken: param {j} of layer '{name}' has shape {theirs} but holds "
                    f"{count} values"
                )
    wanted = [name for name, blobs in target.items() if blobs]
    missing = [name for name in wanted if name not in source]
    if wanted and len(missing) == len(wanted):
        held = [name for name, blobs in source.items() if blobs]
        raise ValueError(
            f"{path} fills none of the net's layers with parameters ({_listed(wanted)}); it holds weights "
            f"for {_listed(held) if held else 'no layer'}"
        )
    if missing:
        warnings.warn(
            f"{path} has no weights for layer{'s' if len(missing) > 1 else ''} {_listed(missing)} of the "
            "net: they keep Caffe's initial values (their weight_filler, zero by default)",
            MissingWeightsWarning,
            stacklevel=3,
        )


def _listed(names: list[str], most: int = 10) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


@contextlib.contextmanager
def _quiet_caffe():
    """Caffe logs every layer it sets up at INFO (3,800 lines for open_nsfw): ERROR and above only,
    then the user's level again."""
    level = _core.log_level()
    _core.set_log_level(max(level, 2))
    try:
        yield
    finally:
        _core.set_log_level(level)


def _reason(stderr: str) -> str:
    reasons = [next(g for g in m.groups() if g) for m in map(_REASON.match, stderr.splitlines()) if m]
    if reasons:
        return "; ".join(dict.fromkeys(r.strip() for r in reasons))
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "the trial process failed without a message"
