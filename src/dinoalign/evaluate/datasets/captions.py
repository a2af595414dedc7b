"""Image–caption retrieval sets in Karpathy's split format (``dataset_coco.json``,
``dataset_flickr30k.json``, ``dataset_flickr8k.json``)."""

from __future__ import annotations

import json

from dinoalign.evaluate.datasets.base import EVAL_DATASETS, DatasetFiles, RetrievalDataset


@EVAL_DATASETS.register("karpathy")
def karpathy(
    root: str, json_file: str = "dataset_coco.json", split: str = "test"
) -> RetrievalDataset:
    """Images under ``root`` at ``<filepath>/<filename>`` (COCO: ``val2014/...``; Flickr
    files have no ``filepath``: images directly under ``root``), each with the ``raw`` text
    of its ``sentences``. ``json_file`` is relative to ``root`` unless absolute or a URI;
    ``split`` is one of the file's splits (``train``, ``restval``, ``val``, ``test``) or
    several joined by commas (``train,restval``)."""
    files = DatasetFiles(root)
    try:
        entries = json.loads(files.read_text_ref(json_file))["images"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(
            f"{json_file} is not a Karpathy split file (a JSON object with an 'images' list)"
        ) from None
    splits = {s.strip() for s in split.split(",") if s.strip()}
    samples = []
    for entry in entries:
        if entry.get("split") not in splits:
            continue
        path = "/".join(p for p in (entry.get("filepath", ""), entry["filename"]) if p)
        samples.append((path, [s["raw"].strip() for s in entry.get("sentences", [])]))
    if not samples:
        found = sorted({str(e.get("split")) for e in entries})
        raise ValueError(f"{json_file} has no images in split(s) {sorted(splits)}; it has {found}")
    return RetrievalDataset(files, samples)
