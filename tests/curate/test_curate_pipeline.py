from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from curate_mixture import make_mixture
from dinoalign.config import from_dict
from dinoalign.curate import CurateConfig, curate
from dinoalign.data.schema import make_uid

ANIMALS = ["cat", "dog", "horse", "sea lion"]
SIZES = [900, 300, 120, 60, 20]  # true image clusters


@pytest.fixture(scope="module")
def pairs() -> tuple[list[str], np.ndarray, list[list[str]]]:
    """1404 pairs: (uids, embeddings N×16 of varied norms, captions); the last 4 are
    near-copies of pair 0."""
    points, _, _ = make_mixture(SIZES, dim=16, noise=0.05, seed=0)
    rng = np.random.default_rng(0)
    copies = points[0] + 1e-4 * rng.standard_normal((4, 16))
    embeddings = np.concatenate([points, copies])
    embeddings *= rng.uniform(0.5, 3.0, size=(len(embeddings), 1))  # curate normalises
    # text: "cat" in 70% of captions, the rest shared by the other animals
    animal = rng.choice(len(ANIMALS), size=len(embeddings), p=[0.7, 0.15, 0.1, 0.05])
    captions = [[f"a photo of a {ANIMALS[a]}", "an image"] for a in animal]
    uids = [make_uid("test", str(i)) for i in range(len(embeddings))]
    return uids, embeddings.astype(np.float32), captions


def _config(**overrides) -> CurateConfig:
    base = CurateConfig(
        levels=[20, 5],
        resample_steps=[2, 1],
        resample_points=[10, 2],
        kmeans_iters=10,
        target_size=400,
        text_vocab=ANIMALS,
        text_threshold=60,
        dedup_threshold=1e-4,
        combine="intersection",
    )
    return dataclasses.replace(base, **overrides)


def test_result_table_and_stats(pairs):
    uids, embeddings, captions = pairs
    result = curate(uids, embeddings, captions, _config())
    table = result.table
    assert table.column_names == [
        "uid",
        "cluster_l1",
        "cluster_l2",
        "kept_image",
        "kept_text",
        "kept_dedup",
        "kept",
    ]
    assert table.column("uid").to_pylist() == sorted(uids)
    kept = {name: np.array(table.column(name).to_pylist()) for name in table.column_names[3:]}
    assert np.array_equal(kept["kept"], kept["kept_image"] & kept["kept_text"])
    assert not (kept["kept_image"] & ~kept["kept_dedup"]).any()
    assert not (kept["kept_text"] & ~kept["kept_dedup"]).any()
    assert kept["kept_image"].sum() == 400

    # the 4 planted copies of pair 0 and pair 0 form one group: 4 of the 5 are removed
    row_of = {uid: i for i, uid in enumerate(table.column("uid").to_pylist())}
    group = [row_of[uids[0]]] + [row_of[uid] for uid in uids[-4:]]
    assert kept["kept_dedup"][group].sum() == 1
    assert kept["kept_dedup"][min(group)]  # the smallest uid survives

    stats = result.stats
    json.dumps(stats)
    n = len(uids)
    assert stats["n_input"] == n and stats["n_kept"] == kept["kept"].sum()
    assert stats["removed"] == {
        "dedup": 4,
        "image_balancing": int((kept["kept_dedup"] & ~kept["kept_image"]).sum()),
        "text_balancing": int((kept["kept_dedup"] & ~kept["kept_text"]).sum()),
        "total": int(n - kept["kept"].sum()),
    }
    for depth, level in enumerate(stats["kmeans"]["levels"]):
        column = np.array(table.column(f"cluster_l{depth + 1}").to_pylist())
        assert level["sizes_before"] == np.bincount(column, minlength=level["k"]).tolist()
        assert sum(level["sizes_after"]) == stats["n_kept"]
        assert len(level["faiss_points"]) == 1 + _config().resample_steps[depth]
    text = stats["text"]
    assert list(text["caption_counts_before"]) == ANIMALS
    assert sum(text["caption_counts_before"].values()) == n  # one animal caption per pair
    # "cat" is in ~980 captions, far above t = 60: it is cut hardest
    assert text["caption_counts_after"]["cat"] < 0.2 * text["caption_counts_before"]["cat"]


def test_same_seed_same_output_and_row_order_does_not_matter(pairs):
    uids, embeddings, captions = pairs
    cfg = _config(leaf_strategy="random")
    first = curate(uids, embeddings, captions, cfg)
    again = curate(uids, embeddings, captions, cfg)
    order = np.random.default_rng(1).permutation(len(uids))
    shuffled = curate(
        [uids[i] for i in order], embeddings[order], [captions[i] for i in order], cfg
    )
    assert first.table.equals(again.table)
    assert first.table.equals(shuffled.table)
    assert first.stats == shuffled.stats
    assert first.curated_uids == shuffled.curated_uids
    other_seed = curate(uids, embeddings, captions, dataclasses.replace(cfg, seed=cfg.seed + 1))
    assert other_seed.curated_uids != first.curated_uids


@pytest.mark.parametrize("combine", ["image", "text", "all"])
def test_combine_modes(pairs, combine):
    uids, embeddings, captions = pairs
    table = curate(uids, embeddings, captions, _config(combine=combine)).table
    kept = np.array(table.column("kept").to_pylist())
    source = {"image": "kept_image", "text": "kept_text", "all": "kept_dedup"}[combine]
    assert np.array_equal(kept, np.array(table.column(source).to_pylist()))


def test_without_vocab_or_dedup_nothing_is_filtered_on_those_sides(pairs):
    uids, embeddings, captions = pairs
    result = curate(
        uids,
        embeddings,
        captions,
        _config(text_vocab=None, dedup_threshold=None, combine="image", target_size=10_000),
    )
    assert result.table.column("kept").to_pylist() == [True] * len(uids)
    assert result.stats["text"] == {"enabled": False}
    assert result.stats["dedup"] == {"threshold": None}


def test_config_from_params_dict_and_its_errors(tmp_path):
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("cat\ndog\n")
    cfg = from_dict(
        CurateConfig,
        {
            "levels": [4, 2],
            "resample_points": [3, 1],
            "text_vocab": str(vocab_file),
            "combine": "intersection",
            "dedup_threshold": None,
        },
    )
    assert cfg.levels == [4, 2] and cfg.text_vocab == str(vocab_file)
    with pytest.raises(ValueError, match=r"needs curate\.text_vocab"):
        CurateConfig(combine="text")
    with pytest.raises(ValueError, match="leaf_strategy"):
        CurateConfig(leaf_strategy="nearest")
    with pytest.raises(ValueError, match="combine"):
        CurateConfig(combine="union")
    with pytest.raises(ValueError, match="one value per level"):
        CurateConfig(levels=[100, 10, 2])
    with pytest.raises(ValueError, match="cosine distance"):
        CurateConfig(dedup_threshold=0.0)


def test_vocab_file_is_read(pairs, tmp_path):
    uids, embeddings, captions = pairs
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(ANIMALS))
    from_file = curate(uids, embeddings, captions, _config(text_vocab=str(vocab_file)))
    from_list = curate(uids, embeddings, captions, _config())
    assert from_file.table.equals(from_list.table)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda u, e, c: (u[:-1], e, c), "one of each per pair"),
        (lambda u, e, c: ([u[0], *u[1:-1], u[0]], e, c), "more than once"),
        (
            lambda u, e, c: (u, np.vstack([np.zeros((1, e.shape[1]), e.dtype), e[1:]]), c),
            "all zeros",
        ),
        (lambda u, e, c: (u, np.where(np.arange(len(e))[:, None] == 3, np.nan, e), c), "NaN"),
        (lambda u, e, c: (u, e[:, 0], c), "N×D"),
        (lambda u, e, c: (u, e, ["a cat", *c[1:]]), "list of captions"),
    ],
)
def test_bad_inputs_are_explained(pairs, mutate, message):
    uids, embeddings, captions = pairs
    with pytest.raises((ValueError, TypeError), match=message):
        curate(*mutate(list(uids), embeddings, list(captions)), _config())
