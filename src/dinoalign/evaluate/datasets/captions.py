"""Image–caption retrieval sets in Karpathy's split format (``dataset_coco.json``,
``dataset_flickr30k.json``, ``dataset_flickr8k.json``)."""

from __future__ import annotations

import json

from dinoalign.errors import DatasetError, DatasetFileMissing
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
    source = files.ref_uri(json_file)
    try:
        text = files.read_text_ref(json_file)
    except DatasetFileMissing as e:
        raise DatasetFileMissing(
            f"{e}: set the option json_file to the Karpathy split file"
        ) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{source}: not valid JSON ({e})") from None
    entries = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise DatasetError(
            f"{source} is not a Karpathy split file (a JSON object with an 'images' list)"
        )
    splits = {s.strip() for s in split.split(",") if s.strip()}
    samples = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DatasetError(f"{source}: images[{i}] is a {type(entry).__name__}, not an object")
        if entry.get("split") not in splits:
            continue
        samples.append(_sample(entry, f"{source}: images[{i}]"))
    if not samples:
        found = sorted({str(e.get("split")) for e in entries})
        raise DatasetError(
            f"{source} has no images in split(s) {sorted(splits)}; it has {found}"
        )
    return RetrievalDataset(files, samples)


def _sample(entry: dict, where: str) -> tuple[str, list[str]]:
    """(image path, captions) of one ``images`` entry; ``where`` names it in errors."""
    filename, filepath = entry.get("filename"), entry.get("filepath", "")
    if not isinstance(filename, str) or not filename:
        raise DatasetError(f"{where} has no 'filename' (the image's file name)")
    if not isinstance(filepath, str):
        raise DatasetError(f"{where}: 'filepath' must be a folder name, got {filepath!r}")
    sentences = entry.get("sentences", [])
    if not isinstance(sentences, list):
        raise DatasetError(
            f"{where}: 'sentences' must be a list, got {type(sentences).__name__}"
        )
    captions = []
    for j, sentence in enumerate(sentences):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        if not isinstance(raw, str):
            raise DatasetError(
                f"{where} ({filename}): sentences[{j}] has no 'raw' text (the caption)"
            )
        captions.append(raw.strip())
    return "/".join(p for p in (filepath, filename) if p), captions
