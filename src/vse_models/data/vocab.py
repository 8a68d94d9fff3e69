"""Tokeniser and vocabulary (SPEC §4).

The tokeniser needs no downloads (older code needed nltk's punkt): lower-case, then split into runs of
word characters and single punctuation marks. The vocabulary is stored in SCAN's JSON format
`{"word2idx": {...}, "idx2word": {"0": "<pad>", ...}, "idx": n}` with <pad>=0, <start>=1, <end>=2,
<unk>=3, and is built from the *training* captions only (vsepp built it with test captions too).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

_TOKEN = re.compile(r"\w+|[^\w\s]")

PAD, START, END, UNK = 0, 1, 2, 3
SPECIAL = ("<pad>", "<start>", "<end>", "<unk>")


def tokenize(text: str) -> list[str]:
    """'A dog, running.' -> ['a', 'dog', ',', 'running', '.']"""
    return _TOKEN.findall(text.lower())


class Vocabulary:
    """word <-> index map with the four SCAN special tokens at 0..3."""

    def __init__(self, words: Iterable[str] = ()):
        self.idx2word: list[str] = list(SPECIAL)
        self.word2idx: dict[str, int] = {w: i for i, w in enumerate(SPECIAL)}
        for w in words:
            self.add(w)

    def add(self, word: str) -> int:
        if word not in self.word2idx:
            self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return self.word2idx[word]

    def __len__(self) -> int:
        return len(self.idx2word)

    def __contains__(self, word: str) -> bool:
        return word in self.word2idx

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.idx2word == other.idx2word

    def encode(self, caption: str) -> list[int]:
        """Token ids of `caption` wrapped in <start> ... <end>; unknown words map to <unk>."""
        return [START] + [self.word2idx.get(t, UNK) for t in tokenize(caption)] + [END]

    def decode(self, ids: Iterable[int]) -> str:
        words = [self.idx2word[int(i)] for i in ids if int(i) not in (PAD, START, END)]
        return " ".join(words)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 4) -> "Vocabulary":
        """Words seen at least `min_count` times, most frequent first (ties alphabetical: deterministic)."""
        counts = Counter(t for c in captions for t in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(w for w in kept if w not in SPECIAL)

    def to_json(self) -> dict:
        return {"word2idx": dict(self.word2idx), "idx2word": {str(i): w for i, w in enumerate(self.idx2word)},
                "idx": len(self.idx2word)}

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), ensure_ascii=False))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            idx2word = data["idx2word"]
            words = [idx2word[str(i)] for i in range(len(idx2word))]
        except FileNotFoundError:
            raise FileNotFoundError(f"vocabulary file not found: {path}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a SCAN vocabulary JSON ({{'word2idx', 'idx2word', 'idx'}}): {e}") from None
        if tuple(words[:4]) != SPECIAL:
            raise ValueError(f"{path}: the first four words must be {SPECIAL}, got {tuple(words[:4])}")
        if data.get("word2idx") and any(data["word2idx"].get(w) != i for i, w in enumerate(words)):
            raise ValueError(f"{path}: word2idx and idx2word disagree")
        vocab = cls()
        for w in words[4:]:
            vocab.add(w)
        return vocab
