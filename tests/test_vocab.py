import json

import pytest

from vse_models.data import Vocabulary, tokenize
from vse_models.data.vocab import END, PAD, START, UNK


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("A Dog, running.") == ["a", "dog", ",", "running", "."]
    assert tokenize("  two  cats!\t") == ["two", "cats", "!"]


def test_build_counts_training_captions_only_with_min_count():
    caps = ["a dog runs", "a dog sits", "a cat", "a dog"]
    v = Vocabulary.build(caps, min_count=2)
    assert v.idx2word[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert v.idx2word[4:] == ["a", "dog"]  # by frequency, ties alphabetical; "cat" (1) dropped
    assert v.encode("A dog and a cat") == [START, v.word2idx["a"], v.word2idx["dog"], UNK,
                                           v.word2idx["a"], UNK, END]
    assert v.decode([START, 4, 5, END, PAD]) == "a dog"


def test_scan_json_round_trip(tmp_path):
    v = Vocabulary.build(["the red ball", "the red ball", "a blue kite"], min_count=1)
    path = tmp_path / "vocab.json"
    v.save(path)
    data = json.loads(path.read_text())
    assert set(data) == {"word2idx", "idx2word", "idx"}
    assert data["idx"] == len(v) and data["idx2word"]["0"] == "<pad>" and data["word2idx"]["<unk>"] == 3
    assert Vocabulary.load(path) == v


def test_load_rejects_malformed_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Vocabulary.load(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"word2idx": {}, "idx2word": {"0": "x", "1": "y", "2": "z", "3": "w"}, "idx": 4}))
    with pytest.raises(ValueError, match="wrong.json.*first four"):
        Vocabulary.load(wrong)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Vocabulary.load(tmp_path / "missing.json")
