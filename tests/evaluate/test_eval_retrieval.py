"""Image↔text retrieval metrics against brute force, chance levels, and a dataset scored
the way the evaluate stage scores it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dinoalign.evaluate.datasets import EVAL_DATASETS
from dinoalign.evaluate.metrics import chance_recall_at_k
from dinoalign.evaluate.retrieval import (
    percent_of_reference,
    retrieval_metrics,
    retrieval_metrics_from_similarity,
)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def _brute_force(image_emb, text_emb, owner, k):
    """Loop version: rank the gallery by cosine, hit if any positive is in the top k."""
    i2t = t2i = 0
    for i, img in enumerate(image_emb):
        order = sorted(range(len(text_emb)), key=lambda t: -_cos(img, text_emb[t]))
        i2t += any(owner[t] == i for t in order[:k])
    for t, txt in enumerate(text_emb):
        order = sorted(range(len(image_emb)), key=lambda i: -_cos(txt, image_emb[i]))
        t2i += owner[t] in order[:k]
    return i2t / len(image_emb), t2i / len(text_emb)


def test_retrieval_metrics_match_brute_force_across_chunks():
    gen = torch.Generator().manual_seed(3)
    n_images = 11
    owner = [i for i in range(n_images) for _ in range(1 + (i * 7) % 4)]  # 1..4 captions each
    image_emb = torch.randn(n_images, 12, generator=gen)
    text_emb = 0.8 * image_emb[owner] + torch.randn(len(owner), 12, generator=gen)
    ks = (1, 2, 5)
    got = retrieval_metrics(image_emb, text_emb, torch.tensor(owner), ks=ks, chunk_size=4)
    for k in ks:
        i2t, t2i = _brute_force(image_emb, text_emb, owner, k)
        assert got[f"i2t_R@{k}"] == pytest.approx(i2t)
        assert got[f"t2i_R@{k}"] == pytest.approx(t2i)
        captions_of = [owner.count(i) for i in range(n_images)]
        assert got[f"chance_i2t_R@{k}"] == pytest.approx(
            np.mean([chance_recall_at_k(len(owner), c, k) for c in captions_of])
        )
        assert got[f"chance_t2i_R@{k}"] == pytest.approx(k / n_images)
    assert 0 < got["t2i_R@1"] < 1
    assert got["num_images"] == n_images and got["num_texts"] == len(owner)


def test_retrieval_from_a_models_own_scores_matches_loops_with_ties_against():
    # best-head-like scores (max over 3 random "heads"), rounded so that ties occur
    gen = torch.Generator().manual_seed(5)
    n_images = 7
    owner = [i for i in range(n_images) for _ in range(1 + i % 3)]
    scores = torch.randn(len(owner), n_images, 3, generator=gen).amax(-1).mul(4).round()
    scores[torch.arange(len(owner)), torch.tensor(owner)] += 1.0  # positives a bit higher
    got = retrieval_metrics_from_similarity(scores, owner, ks=(1, 2, 5))

    def hit(row: list[float], positive: list[bool], k: int) -> bool:
        best = max(v for v, p in zip(row, positive) if p)
        return sum(v >= best for v, p in zip(row, positive) if not p) < k

    table = scores.tolist()
    for k in (1, 2, 5):
        i2t = np.mean([
            hit([table[t][i] for t in range(len(owner))], [o == i for o in owner], k)
            for i in range(n_images)
        ])
        t2i = np.mean([hit(table[t], [owner[t] == i for i in range(n_images)], k) for t in range(len(owner))])
        assert got[f"i2t_R@{k}"] == pytest.approx(i2t)
        assert got[f"t2i_R@{k}"] == pytest.approx(t2i)
    assert (scores == scores.max()).sum() > 1  # the ties are real
    assert got["chance_t2i_R@1"] == pytest.approx(1 / n_images)
    with pytest.raises(ValueError, match="T×M"):
        retrieval_metrics_from_similarity(scores[0], owner)


def test_retrieval_metrics_reject_images_without_captions():
    with pytest.raises(ValueError, match="1 images have no caption"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="one entry per caption"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 1, 2]))


def test_percent_of_reference():
    ours = {"i2t_R@1": 0.3, "t2i_R@1": 0.2, "chance_i2t_R@1": 0.01, "num_images": 10.0}
    clip = {"i2t_R@1": 0.6, "t2i_R@1": 0.25, "chance_i2t_R@1": 0.01}
    assert percent_of_reference(ours, clip) == {
        "i2t_R@1_pct": pytest.approx(50.0),
        "t2i_R@1_pct": pytest.approx(80.0),
    }


def test_retrieval_on_a_karpathy_split_as_the_stage_scores_it(tmp_path):
    """The evaluate stage's dataset path: captions grouped per image, the model's T×M
    scores into :func:`retrieval_metrics_from_similarity` (and CLIP's embeddings into
    :func:`retrieval_metrics` for the reference)."""
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    words = ["red", "green", "blue"]
    entries = []
    for i, rgb in enumerate(colours):
        Image.fromarray(np.full((4, 5, 3), rgb, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        sentences = [{"raw": f"a {words[i]} square"}, {"raw": f"something {words[i]}"}][: 1 + i % 2]
        entries.append({"filename": f"{i}.png", "split": "test", "sentences": sentences})
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": entries}))
    dataset = EVAL_DATASETS.build("karpathy", str(tmp_path), json_file="dataset_flickr8k.json")

    def encode_images(images: list[np.ndarray]) -> torch.Tensor:
        return torch.stack([torch.from_numpy(im.reshape(-1, 3).mean(0)).float() for im in images])

    def encode_texts(texts: list[str]) -> torch.Tensor:
        return torch.stack(
            [torch.eye(3)[next(j for j, w in enumerate(words) if w in t)] for t in texts]
        )

    captions = [dataset[i][1] for i in range(len(dataset))]
    owner = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
    np.testing.assert_array_equal(owner, dataset.caption_image_index)
    images = encode_images([dataset[i][0] for i in range(len(dataset))])

    def evaluate(encode_texts) -> dict[str, float]:
        text = encode_texts([c for caps in captions for c in caps])
        scores = retrieval_metrics_from_similarity(text @ images.T, owner, ks=(1,))
        assert scores == pytest.approx(retrieval_metrics(images, text, owner, ks=(1,)))
        return scores

    result = evaluate(encode_texts)
    assert result["i2t_R@1"] == 1.0 and result["t2i_R@1"] == 1.0
    assert result["num_texts"] == 4
    assert result["chance_t2i_R@1"] == pytest.approx(1 / 3)
    rolled = evaluate(lambda t: encode_texts(t).roll(1, 1))
    assert rolled["i2t_R@1"] == 0.0 and rolled["t2i_R@1"] == 0.0
