from __future__ import annotations

import math
import re

import numpy as np
import pytest

from dinoalign.curate.text_balance import EntryMatcher, balance_text, load_vocab


@pytest.mark.parametrize(
    ("entry", "caption", "matches"),
    [
        ("cat", "A cat.", True),
        ("cat", "a category of things", False),  # not inside a longer word
        ("cat", "a bobcat", False),
        ("cat", "two cats", False),  # plurals are separate entries
        ("cat", "the CAT's toy", True),  # case-insensitive; apostrophe separates words
        ("cat", "cat_food", False),  # underscore is a word character
        ("new york", "New-York  City", True),  # any separators between the words
        ("new york", "newyork", False),
        ("new york", "new jersey and york", False),  # the words must be consecutive
        ("t-shirt", "a red t shirt", True),
        ("über", "Ein ÜBER-Auto", True),  # Unicode letters and case folding
    ],
)
def test_matching_rule(entry, caption, matches):
    assert (EntryMatcher([entry]).match(caption) == {0}) is matches


def _regex_reference(entry: str, caption: str) -> bool:
    """Whole-word, case-insensitive match of the entry's words with any non-word gap."""
    parts = re.findall(r"\w+", entry.casefold())
    pattern = r"(?<!\w)" + r"\W+".join(map(re.escape, parts)) + r"(?!\w)"
    return re.search(pattern, caption.casefold()) is not None


def test_matcher_agrees_with_a_regex_reference():
    vocab = ["cat", "black cat", "dog", "hot dog", "sea", "sea lion", "lion", "a"]
    pieces = ["cat", "cats", "black", "dog", "hot", "sea", "seal", "lion", "a", "on", "category"]
    separators = [" ", "  ", "-", ", ", ". ", "'", "/"]
    rng = np.random.default_rng(0)
    matcher = EntryMatcher(vocab)
    for _ in range(500):
        n_words = int(rng.integers(1, 7))
        caption_words = [
            w.upper() if rng.random() < 0.3 else w for w in rng.choice(pieces, n_words)
        ]
        gaps = [*rng.choice(separators, n_words - 1), ""]
        caption = "".join(word + gap for word, gap in zip(caption_words, gaps))
        expected = {i for i, entry in enumerate(vocab) if _regex_reference(entry, caption)}
        assert matcher.match(caption) == expected, caption


def test_overlapping_entries_all_match_and_spellings_merge():
    matcher = EntryMatcher(["New York", "york", "new-york", "T-Shirt", "t shirt"])
    assert matcher.entries == ["New York", "york", "T-Shirt"]
    assert matcher.match("new york city, and a t-shirt") == {0, 1, 2}


def _pairs(spec: list[tuple[int, list[str]]]) -> tuple[list[str], list[list[str]]]:
    """[(how many pairs, their captions)] -> (uids, captions)."""
    captions = [list(caps) for count, caps in spec for _ in range(count)]
    return [f"pair-{i:05d}" for i in range(len(captions))], captions


def test_frequent_entries_are_capped_to_about_t():
    t = 50
    uids, captions = _pairs(
        [(1000, ["a cat on a sofa"]), (200, ["a bird in a tree"]), (40, ["a dog barking"])]
    )
    result = balance_text(uids, captions, ["cat", "bird", "dog"], t, keep_unmatched=True, seed=0)
    assert result.entry_counts.tolist() == [1000, 200, 40]
    kept = result.entry_caption_counts(result.kept)
    # cat: Binomial(1000, 0.05), bird: Binomial(200, 0.25), dog: all 40 (p = 1)
    for count_kept, n, p in [(kept[0], 1000, 0.05), (kept[1], 200, 0.25)]:
        assert abs(count_kept - n * p) <= 4 * math.sqrt(n * p * (1 - p))
    assert kept[2] == 40
    np.testing.assert_allclose(np.unique(result.keep_probability), [0.05, 0.25, 1.0])


def test_a_pair_takes_the_probability_of_its_rarest_entry():
    uids, captions = _pairs(
        [
            (300, ["a cat"]),
            (10, ["a cat", "a cat and a dog"]),  # cat 2 captions per pair, dog 1
            (5, ["a dog"]),
            (3, ["a cat cat cat"]),  # one caption counts once
        ]
    )
    result = balance_text(uids, captions, ["cat", "dog"], 30, keep_unmatched=True, seed=0)
    assert result.entry_counts.tolist() == [300 + 20 + 3, 10 + 5]
    cat_probability = 30 / 323
    expected = [cat_probability] * 300 + [1.0] * 15 + [cat_probability] * 3
    np.testing.assert_allclose(result.keep_probability, expected)
    assert result.kept[300:315].all()


@pytest.mark.parametrize("keep_unmatched", [True, False])
def test_pairs_matching_no_entry_are_kept_or_dropped_as_asked(keep_unmatched):
    uids, captions = _pairs([(20, ["a cat"]), (30, ["a category", "an empty room"]), (5, [])])
    result = balance_text(uids, captions, ["cat"], 100, keep_unmatched=keep_unmatched, seed=0)
    assert result.kept[:20].all()  # 20 <= t
    assert result.unmatched().tolist() == [False] * 20 + [True] * 35
    assert (result.kept[20:] == keep_unmatched).all()


def test_ineligible_pairs_are_neither_counted_nor_kept():
    uids, captions = _pairs([(100, ["a cat"])])
    eligible = np.arange(100) < 10
    result = balance_text(uids, captions, ["cat"], 10, True, seed=0, eligible=eligible)
    assert result.entry_counts.tolist() == [10]
    assert result.kept.tolist() == eligible.tolist()  # p = 10/10 for the eligible ones


def test_decisions_follow_the_uid_not_the_row():
    uids, captions = _pairs([(400, ["a cat"])])
    forward = balance_text(uids, captions, ["cat"], 100, True, seed=1)
    backward = balance_text(uids[::-1], captions[::-1], ["cat"], 100, True, seed=1)
    assert np.array_equal(forward.kept, backward.kept[::-1])
    assert 0 < forward.kept.sum() < 400


def test_vocab_from_a_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("# concepts\ncat\n\n  new york  \nsea lion\n", encoding="utf-8")
    assert load_vocab(str(path)) == ["cat", "new york", "sea lion"]
    assert load_vocab(["a", "b"]) == ["a", "b"]


def test_bad_vocab_and_threshold_are_explained():
    with pytest.raises(ValueError, match="empty"):
        EntryMatcher([])
    with pytest.raises(ValueError, match="no letters"):
        EntryMatcher(["cat", "!!!"])
    with pytest.raises(ValueError, match="> 0"):
        balance_text(["a"], [["a cat"]], ["cat"], 0, True, seed=0)
    with pytest.raises(ValueError, match="one per pair"):
        balance_text(["a", "b"], [["a cat"]], ["cat"], 1, True, seed=0)
