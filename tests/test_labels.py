"""Caffe's label files, read as classify.py's users have them."""

import pytest

from fastsal._labels import read_labels


def test_synset_words_drop_the_wordnet_id(tmp_path):
    path = tmp_path / "synset_words.txt"
    path.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n\n")
    assert read_labels(path, 2) == ["tench, Tinca tinca", "goldfish, Carassius auratus"]


def test_plain_names_are_kept_whole(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("SFW\nNSFW\n")
    assert read_labels(path) == ["SFW", "NSFW"]


@pytest.mark.parametrize(
    ("text", "match"), [("a\nb\nc\n", "names 3 classes; the net has 2"), ("\n\n", "no classes")]
)
def test_bad_label_files_are_refused(tmp_path, text, match):
    path = tmp_path / "labels.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_labels(path, 2)


def test_a_folder_or_binary_file_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        read_labels(tmp_path)
    path = tmp_path / "labels.bin"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=f"the labels file {path} is not UTF-8 text"):
        read_labels(path)
