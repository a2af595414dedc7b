"""Text-side balancing over a metadata vocabulary (MetaCLIP-style).

Matching rule: an entry matches a caption when the entry's words appear in the caption
consecutively, as whole words, ignoring case. Words are maximal runs of Unicode word
characters (letters, digits, underscore); whatever separates them (spaces, hyphens,
punctuation) is not compared. So "cat" matches "A cat." and "CAT's toy" but neither
"category" nor "cats"; "new york" matches "New-York" and "new  york"; "t-shirt" and
"t shirt" are the same entry. Entries may overlap: "new york" and "york" both match
"new york city".

Balancing rule: count(e) = number of captions (of the eligible pairs) that match e. A
pair keeps with probability p = min(1, t / count(e*)) where e* is the rarest entry that
any of its captions matches (the largest of its entries' probabilities, as in MetaCLIP:
a pair that mentions any tail concept is kept as a tail pair). Pairs matching no entry
are kept or dropped as a whole (``keep_unmatched``). The draw for a pair is
:func:`~dinoalign.curate.sampling.uid_uniforms` of its uid, so a decision depends only on
(uid, seed, counts).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from dinoalign.curate.sampling import uid_uniforms
from dinoalign.storage import open_uri

_WORD = re.compile(r"\w+")


def words(text: str) -> tuple[str, ...]:
    """The case-folded words of ``text`` (runs of Unicode word characters)."""
    return tuple(_WORD.findall(text.casefold()))


def load_vocab(spec: Sequence[str] | str) -> list[str]:
    """A vocabulary given as a list of entries, or the path/URI of a UTF-8 text file with
    one entry per line (blank lines and lines starting with ``#`` are skipped)."""
    if isinstance(spec, str):
        with open_uri(spec, "rb") as f:
            lines = f.read().decode("utf-8").splitlines()
        return [
            line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
        ]
    return list(spec)


class EntryMatcher:
    """Finds the vocabulary entries that a caption matches (rule in the module docstring).

    Entries that reduce to the same words (e.g. "T-shirt", "t shirt") are one entry,
    named by its first spelling. Matching costs O(words in caption × longest entry),
    independent of the vocabulary size.
    """

    def __init__(self, vocab: Sequence[str]) -> None:
        if not vocab:
            raise ValueError("the text vocabulary is empty: give curate.text_vocab entries")
        self.entries: list[str] = []
        self._index: dict[tuple[str, ...], int] = {}
        for entry in vocab:
            key = words(entry)
            if not key:
                raise ValueError(f"vocabulary entry {entry!r} has no letters or digits; remove it")
            if key not in self._index:
                self._index[key] = len(self.entries)
                self.entries.append(entry)
        self._max_words = max(len(key) for key in self._index)

    def match(self, caption: str) -> set[int]:
        """Indices (into ``entries``) of the entries that ``caption`` matches."""
        caption_words = words(caption)
        found: set[int] = set()
        for start in range(len(caption_words)):
            for length in range(1, min(self._max_words, len(caption_words) - start) + 1):
                entry = self._index.get(caption_words[start : start + length])
                if entry is not None:
                    found.add(entry)
        return found


@dataclasses.dataclass(frozen=True)
class TextBalance:
    """The outcome of :func:`balance_text` for N pairs and E entries.

    ``caption_matches``: per pair, per caption, the indices of the entries it matches.
    ``entry_counts``: E int64, the balancing counts (captions of eligible pairs).
    ``keep_probability``: N float64 (0 for ineligible pairs). ``kept``: N bool.
    """

    entries: list[str]
    caption_matches: list[list[tuple[int, ...]]]
    entry_counts: np.ndarray
    keep_probability: np.ndarray
    kept: np.ndarray

    def entry_caption_counts(self, rows: np.ndarray) -> np.ndarray:
        """E int64: the captions of the pairs in ``rows`` (N bool) that match each entry."""
        return count_entry_captions(self.caption_matches, rows, len(self.entries))

    def unmatched(self) -> np.ndarray:
        """N bool: pairs none of whose captions matches any entry."""
        return np.array([not any(caption) for caption in self.caption_matches], dtype=bool)


def balance_text(
    uids: Sequence[str],
    captions: Sequence[Sequence[str]],
    vocab: Sequence[str],
    threshold: float,
    keep_unmatched: bool,
    seed: int,
    eligible: np.ndarray | None = None,
) -> TextBalance:
    """Keep each eligible pair with probability min(1, t / count(rarest matched entry)).

    ``uids``, ``captions``: N pairs (several captions each); ``threshold``: t > 0;
    ``eligible``: N bool, the pairs that are counted and may be kept (default all).
    """
    if threshold <= 0:
        raise ValueError(f"text threshold t must be > 0, got {threshold}")
    if len(uids) != len(captions):
        raise ValueError(f"{len(uids)} uids but {len(captions)} caption lists: give one per pair")
    eligible = np.ones(len(uids), dtype=bool) if eligible is None else np.asarray(eligible, bool)
    matcher = EntryMatcher(vocab)
    caption_matches = [
        [tuple(sorted(matcher.match(caption))) for caption in pair_captions]
        for pair_captions in captions
    ]
    entry_counts = count_entry_captions(caption_matches, eligible, len(matcher.entries))
    # max(count, 1): an entry that no eligible caption matches is never looked up.
    entry_probability = np.minimum(1.0, threshold / np.maximum(entry_counts, 1))
    keep_probability = np.zeros(len(uids))
    for row in np.flatnonzero(eligible):
        matched = [e for entries in caption_matches[row] for e in entries]
        if matched:
            keep_probability[row] = entry_probability[matched].max()
        elif keep_unmatched:
            keep_probability[row] = 1.0
    kept = uid_uniforms(uids, seed, stream="text") < keep_probability
    return TextBalance(
        entries=matcher.entries,
        caption_matches=caption_matches,
        entry_counts=entry_counts,
        keep_probability=keep_probability,
        kept=kept,
    )


def count_entry_captions(
    caption_matches: list[list[tuple[int, ...]]], rows: np.ndarray, n_entries: int
) -> np.ndarray:
    """n_entries int64: captions of the pairs in ``rows`` (N bool) that match each entry."""
    counts = np.zeros(n_entries, dtype=np.int64)
    for row in np.flatnonzero(rows):
        for entries in caption_matches[row]:
            counts[list(entries)] += 1
    return counts
