"""Class names for the report, export and overlays: Caffe's label files (``synset_words.txt``, one class
per line, "n01440764 tench, Tinca tinca") or any file with one name per line."""

from __future__ import annotations

import os
import re

# A WordNet id leading a line of Caffe's synset_words.txt; the name is the rest of the line.
_SYNSET = re.compile(r"^n\d{8}\s+")


def read_labels(path: str | os.PathLike, num_classes: int | None = None) -> list[str]:
    """The class names in ``path``, in class order: line i names class i. A leading WordNet id is
    dropped ("n01440764 tench, Tinca tinca" -> "tench, Tinca tinca"); blank lines at the end are
    ignored. With ``num_classes``, a file naming another number of classes raises ValueError, since
    every name after the first missing or extra line would be another class's."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except IsADirectoryError:
        raise ValueError(f"the labels file {os.fspath(path)} is a folder") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"the labels file {os.fspath(path)} is not UTF-8 text ({error.reason})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [_SYNSET.sub("", line.strip()) for line in lines]
    if not names:
        raise ValueError(f"the labels file {os.fspath(path)} names no classes")
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(
            f"the labels file {os.fspath(path)} names {len(names)} classes; the net has {num_classes}"
        )
    return names
