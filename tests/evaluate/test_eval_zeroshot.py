"""Templates, class text embeddings and zero-shot classification."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as OPEN_CLIP_TEMPLATES
from PIL import Image

from dinoalign.evaluate.datasets import EVAL_DATASETS
from dinoalign.evaluate.templates import (
    OPENAI_IMAGENET_TEMPLATES,
    TALK2DINO_TEMPLATES,
    resolve_templates,
)
from dinoalign.evaluate.zeroshot import (
    class_text_embeddings,
    classification_metrics,
    zeroshot_classify,
    zeroshot_logits,
)


def test_openai_templates_are_open_clips_80_as_strings():
    """The 80 CLIP ImageNet prompts come from open_clip (lambdas there), not a copy here;
    spot-check the strings against the CLIP notebook's list as written."""
    assert len(OPENAI_IMAGENET_TEMPLATES) == len(OPEN_CLIP_TEMPLATES) == 80
    assert [t.replace("{}", "cat") for t in OPENAI_IMAGENET_TEMPLATES] == [
        t("cat") for t in OPEN_CLIP_TEMPLATES
    ]
    assert OPENAI_IMAGENET_TEMPLATES[:2] == ("a bad photo of a {}.", "a photo of many {}.")
    assert OPENAI_IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert all(t.count("{}") == 1 for t in OPENAI_IMAGENET_TEMPLATES)


def test_talk2dino_templates_are_tcls_sub_imagenet_template_exactly():
    """Talk2DINO's DINOText builds class embeddings with ``get_template`` (its
    open_vocabulary_segmentation datasets, inherited from TCL's datasets/templates.py),
    whose ``sub_imagenet_template`` reads, string for string, as below: "a bad photo of a
    {}." (an earlier copy here had "of the")."""
    assert TALK2DINO_TEMPLATES == (
        "itap of a {}.",
        "a bad photo of a {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
    )
    assert set(TALK2DINO_TEMPLATES) <= set(OPENAI_IMAGENET_TEMPLATES)


def test_resolve_templates_validates():
    assert resolve_templates("talk2dino") is TALK2DINO_TEMPLATES
    assert resolve_templates(["{}", "a {} photo"]) == ("{}", "a {} photo")
    with pytest.raises(KeyError, match="known"):
        resolve_templates("imagenet")
    with pytest.raises(ValueError, match="exactly one"):
        resolve_templates(["a photo of a thing"])


class TableTextEncoder:
    """Deterministic fake text tower: a fixed random vector per distinct string."""

    def __init__(self, dim: int = 6) -> None:
        self.dim = dim
        self.table: dict[str, torch.Tensor] = {}
        self.batches: list[int] = []

    def vector(self, text: str) -> torch.Tensor:
        if text not in self.table:
            gen = torch.Generator().manual_seed(len(self.table))
            self.table[text] = torch.randn(self.dim, generator=gen) * (1 + len(text))
        return self.table[text]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.batches.append(len(texts))
        return torch.stack([self.vector(t) for t in texts])


def test_class_text_embeddings_normalise_average_renormalise():
    encoder = TableTextEncoder()
    classes = ["cat", "dog", "red bus"]
    templates = ["a photo of a {}.", "art of the {}.", "{}"]
    got = class_text_embeddings(encoder, classes, templates, batch_size=4)
    assert encoder.batches == [4, 4, 1]  # 9 prompts in batches of 4
    for row, name in zip(got.numpy(), classes):
        units = []
        for template in templates:
            v = encoder.vector(template.replace("{}", name)).numpy()
            units.append(v / np.linalg.norm(v))
        mean = np.sum(units, axis=0) / len(units)
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)


def test_zeroshot_logits_are_100_cos():
    logits = zeroshot_logits(
        torch.tensor([[3.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    )
    np.testing.assert_allclose(
        logits.numpy(), [[100.0, 0.0], [100 / 2**0.5, 100 / 2**0.5]], rtol=1e-6
    )
    with pytest.raises(ValueError, match="share E"):
        zeroshot_logits(torch.zeros(2, 3), torch.zeros(4, 5))


def test_zeroshot_classify_against_loops():
    gen = torch.Generator().manual_seed(0)
    n_classes, n_images = 8, 60
    class_emb = torch.randn(n_classes, 16, generator=gen)
    labels = torch.randint(0, n_classes, (n_images,), generator=gen)
    image_emb = class_emb[labels] + 1.3 * torch.randn(n_images, 16, generator=gen)
    result = zeroshot_classify(image_emb, class_emb, labels)

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b / (a.norm() * b.norm()))

    top1 = top5 = 0
    per_class: dict[int, list[bool]] = {}
    for emb, label in zip(image_emb, labels.tolist()):
        scores = [cos(emb, c) for c in class_emb]
        ranking = sorted(range(n_classes), key=lambda c: -scores[c])
        top1 += ranking[0] == label
        top5 += label in ranking[:5]
        per_class.setdefault(label, []).append(ranking[0] == label)
    assert result["top1"] == pytest.approx(top1 / n_images)
    assert result["top5"] == pytest.approx(top5 / n_images)
    assert result["mean_per_class_recall"] == pytest.approx(
        np.mean([np.mean(v) for v in per_class.values()])
    )
    assert result["chance_top1"] == pytest.approx(1 / 8) and result["chance_top5"] == pytest.approx(
        5 / 8
    )
    assert 0.2 < result["top1"] < 1.0  # informative, not saturated


def test_zeroshot_on_a_class_folder_as_the_stage_scores_it(tmp_path):
    """The evaluate stage's dataset path: class embeddings from the templates, logits B×N
    from the model's scores, then :func:`classification_metrics` on the folder's labels."""
    colours = {"red": (220, 10, 10), "blue": (10, 10, 220)}
    for folder, rgb in (("c0", colours["red"]), ("c1", colours["blue"])):
        for i in range(2):
            (tmp_path / folder).mkdir(exist_ok=True)
            pixels = np.zeros((5 + i, 7, 3), dtype=np.uint8) + np.array(rgb, dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / folder / f"{i}.png")
    (tmp_path / "names.txt").write_text("c0 red\nc1 blue\n")
    dataset = EVAL_DATASETS.build("imagenet_folder", str(tmp_path), class_names_file="names.txt")

    def encode_images(images: list[np.ndarray]) -> torch.Tensor:
        return torch.stack([torch.from_numpy(im.reshape(-1, 3).mean(0)).float() for im in images])

    def encode_texts(texts: list[str]) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0, 0.0] if "red" in t else [0.0, 0.0, 1.0] for t in texts])

    def evaluate(encode_texts) -> dict[str, float | int]:
        images = encode_images([dataset[i][0] for i in range(len(dataset))])
        labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
        classes = class_text_embeddings(encode_texts, dataset.class_names, "talk2dino", 3)
        return classification_metrics(images @ classes.T, labels)

    result = evaluate(encode_texts)
    assert result["top1"] == 1.0 and result["mean_per_class_recall"] == 1.0
    assert result["num_images"] == 4 and result["chance_top1"] == 0.5
    swapped = evaluate(lambda t: encode_texts(t).flip(1))
    assert swapped["top1"] == 0.0


def test_encoders_must_return_one_row_per_input():
    with pytest.raises(ValueError, match="one embedding row per input"):
        class_text_embeddings(lambda texts: torch.zeros(1, 4), ["a", "b"], ["{}"])
