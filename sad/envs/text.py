"""Text helpers shared by the text benchmarks: word tokens and a BM25 index (rank_bm25)."""

from __future__ import annotations

import re

_WORD_RE = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words of ``text``."""
    return _WORD_RE.findall(text.lower())


class BM25Index:
    """BM25 (Okapi) over documents, each tokenized once.

    ``search`` returns only documents sharing a word with the query, best first (ties by
    position): rank_bm25's idf can be <= 0 in tiny collections, so a score threshold would drop
    real matches.
    """

    def __init__(self, documents: list[str]):
        from rank_bm25 import BM25Okapi

        tokenized = [words(d) for d in documents]
        self._vocab = [set(t) for t in tokenized]
        self._bm25 = BM25Okapi([t or ["_"] for t in tokenized])

    def search(self, query: str, k: int) -> list[int]:
        terms = words(query)
        if not terms:
            return []
        scores = self._bm25.get_scores(terms)
        matched = [i for i, vocab in enumerate(self._vocab) if vocab.intersection(terms)]
        return sorted(matched, key=lambda i: (-scores[i], i))[:k]
