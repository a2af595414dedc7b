"""COCO-format captions, with optional COCO-Object semantic masks from instance annotations.

One ``PairRecord`` per image of the captions JSON, holding all of its captions;
``uid = make_uid(cfg.name, str(image_id))``. Rejects (stage ``prepare``):

- ``no_captions``: an image of the ``images`` list without any usable caption;
- ``unknown_image_id``: a caption whose ``image_id`` is not in ``images``
  (uid from ``"caption:<annotation id>"``, key = the image id);
- ``empty_caption``: a caption that is missing or blank (same uid scheme);
- ``bad_annotation``: an instance annotation that cannot be rasterised (the image is
  rejected rather than given a wrong mask).

So ``records + no_captions/bad_annotation rejects == images`` and
``captions in records + caption rejects == caption annotations``.

Semantic masks (when ``instances_json`` is set), the COCO-Object convention of
GroupViT/TCL/Talk2DINO (mmseg): one uint8 PNG per image at
``workdir/masks/<name>/<split>/<image_id>.png`` holding 0 for background and
``1..N`` for the categories in ascending category-id order (1..80 for COCO's 80 thing
classes, see :func:`category_index`); ``classes.json`` beside the split folders lists
the names by index. Crowd regions (``iscrowd=1``, RLE) are painted 255, the ignore index
of the evaluation, because a crowd region outlines many instances loosely and its pixels
are not reliable labels (GroupViT's converter, which starts from COCO-Stuff label maps,
has no ignore pixels: this is our choice, and it only removes crowd pixels from
scoring). Overlaps: crowd regions are painted first, then instances from
the largest to the smallest pixel area (ties by annotation id), so a smaller object (a
cup on a table, a person in front of a bus) wins the pixels it shares with a larger one,
and any instance wins over a crowd region. Polygons are rasterised by sampling pixel
centres (pixel ``(r, c)`` is inside when ``(c + 0.5, r + 0.5)`` is, even-odd rule), the
rule pycocotools approximates; RLEs (uncompressed ``counts`` lists and compressed
strings) are decoded exactly. ``label`` is the category name when the image's
annotations (crowd included) name exactly one category. Images absent from the
instances file's ``images`` list get no mask; listed images without annotations get an
all-background mask.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dinoalign.data.config import CocoSourceConfig
from dinoalign.data.schema import PairRecord, Reject, make_uid
from dinoalign.data.sources import SOURCES, STAGE, clean_caption, join_uri
from dinoalign.errors import DataError, DataFileMissing
from dinoalign.storage import atomic_path, open_uri, write_atomic

BACKGROUND_INDEX = 0
IGNORE_INDEX = 255


class InvalidAnnotation(ValueError):
    """An instance annotation whose segmentation cannot be rasterised."""


@SOURCES.register("coco")
def coco_source(cfg: CocoSourceConfig, workdir: Path) -> Iterator[PairRecord | Reject]:
    """Records for every image of ``cfg.captions_json`` (see the module docstring)."""
    captions_file = _load_coco_json(cfg.captions_json, ("images", "annotations"))
    images = _images_by_id(captions_file["images"], cfg.captions_json)
    captions_by_image: dict[Any, list[str]] = {image_id: [] for image_id in images}
    for position, annotation in enumerate(captions_file["annotations"]):
        image_id = annotation.get("image_id")
        caption = clean_caption(annotation.get("caption"))
        reason = None
        if image_id not in captions_by_image:
            reason, detail = "unknown_image_id", f"image id {image_id!r} is not in 'images'"
        elif caption is None:
            reason, detail = "empty_caption", f"caption of image {image_id} is missing or blank"
        if reason is not None:
            annotation_id = annotation.get("id", f"#{position}")
            yield Reject(
                uid=make_uid(cfg.name, f"caption:{annotation_id}"),
                stage=STAGE,
                reason=reason,
                detail=f"caption annotation {annotation_id}: {detail}",
                key=str(image_id),
            )
            continue
        captions_by_image[image_id].append(caption)

    masks = (
        CocoMasks(cfg.instances_json, Path(workdir) / "masks" / cfg.name / cfg.split)
        if cfg.instances_json
        else None
    )
    for image_id, entry in images.items():
        uid = make_uid(cfg.name, str(image_id))
        if not captions_by_image[image_id]:
            yield Reject(
                uid, STAGE, "no_captions", f"image {image_id} has no caption", str(image_id)
            )
            continue
        mask_uri = label = None
        if masks is not None:
            try:
                mask_uri, label = masks.write(image_id)
            except InvalidAnnotation as exc:
                yield Reject(uid, STAGE, "bad_annotation", str(exc), str(image_id))
                continue
        yield PairRecord(
            uid=uid,
            image_uri=join_uri(cfg.image_dir, entry["file_name"]),
            captions=captions_by_image[image_id],
            split=cfg.split,
            source=cfg.name,
            label=label,
            mask_uri=mask_uri,
        )


class CocoMasks:
    """Writes COCO-Object semantic masks from an instances JSON into ``out_dir``."""

    def __init__(self, instances_json: str, out_dir: Path) -> None:
        instances = _load_coco_json(instances_json, ("images", "annotations", "categories"))
        self.class_index = category_index(instances["categories"])
        self.category_names = {c["id"]: c["name"] for c in instances["categories"]}
        self.image_sizes = {
            image["id"]: (int(image["height"]), int(image["width"]))
            for image in instances["images"]
        }
        self.annotations: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for annotation in instances["annotations"]:
            self.annotations[annotation.get("image_id")].append(annotation)
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        names_by_index = ["background"] + [
            self.category_names[cid] for cid in sorted(self.class_index, key=self.class_index.get)
        ]
        classes = {"classes": names_by_index, "ignore_index": IGNORE_INDEX}
        write_atomic(out_dir.parent / "classes.json", json.dumps(classes, indent=1))

    def write(self, image_id: Any) -> tuple[str | None, str | None]:
        """Write the mask of ``image_id``; return ``(mask path, single-category label)``,
        ``(None, None)`` when the instances file does not list the image."""
        if image_id not in self.image_sizes:
            return None, None
        height, width = self.image_sizes[image_id]
        annotations = self.annotations.get(image_id, [])
        label_map = semantic_mask(annotations, height, width, self.class_index)
        path = self.out_dir / f"{image_id}.png"
        _save_png_atomically(label_map, path)
        categories = {annotation["category_id"] for annotation in annotations}
        label = self.category_names[categories.pop()] if len(categories) == 1 else None
        return str(path), label


def category_index(categories: Sequence[dict[str, Any]]) -> dict[int, int]:
    """COCO category id -> contiguous class index ``1..N`` in ascending id order
    (``0`` is background): COCO's ids 1..90 (with gaps) become 1..80."""
    ids = sorted({c["id"] for c in categories})
    if len(ids) >= IGNORE_INDEX:
        raise DataError(
            f"{len(ids)} categories do not fit a uint8 mask next to background 0 and "
            f"ignore {IGNORE_INDEX}: at most {IGNORE_INDEX - 1} are supported"
        )
    return {category_id: index for index, category_id in enumerate(ids, start=1)}


def semantic_mask(
    annotations: Sequence[dict[str, Any]],
    height: int,
    width: int,
    class_index: dict[int, int],
) -> np.ndarray:
    """H×W uint8 label map of one image's instance annotations (rules in the module
    docstring: crowd -> 255 first, then instances largest to smallest)."""
    label_map = np.full((height, width), BACKGROUND_INDEX, dtype=np.uint8)
    instances: list[tuple[int, int, int, np.ndarray]] = []
    for annotation in annotations:
        where = f"annotation {annotation.get('id')} of image {annotation.get('image_id')}"
        category_id = annotation.get("category_id")
        if category_id not in class_index:
            raise InvalidAnnotation(f"{where}: category id {category_id!r} is not in 'categories'")
        try:
            region = annotation_mask(annotation.get("segmentation"), height, width)
        except (TypeError, ValueError) as exc:  # InvalidAnnotation, or junk numbers in the JSON
            raise InvalidAnnotation(f"{where}: {exc}") from None
        if annotation.get("iscrowd"):
            label_map[region] = IGNORE_INDEX
        else:
            order_key = (-int(region.sum()), int(annotation.get("id") or 0))
            instances.append((*order_key, class_index[category_id], region))
    for _, _, index, region in sorted(instances, key=lambda item: item[:2]):
        label_map[region] = index
    return label_map


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """H×W bool mask of a COCO ``segmentation``: a list of polygons, or an RLE dict with
    ``counts`` as a list (uncompressed) or a string (compressed) and ``size`` [h, w]."""
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        size = segmentation.get("size")
        if size is None or [int(s) for s in size] != [height, width]:
            raise InvalidAnnotation(
                f"RLE size {size} does not match the image size [{height}, {width}]"
            )
        counts = segmentation["counts"]
        if isinstance(counts, (bytes, str)):
            counts = rle_counts_from_string(
                counts.decode() if isinstance(counts, bytes) else counts
            )
        return rle_decode(counts, height, width)
    raise InvalidAnnotation(
        f"segmentation must be polygons or an RLE dict, got {type(segmentation).__name__}"
    )


def rle_counts_from_string(text: str) -> list[int]:
    """Decode COCO's compressed RLE string into run lengths.

    Each count is a little-endian base-32 number, 5 bits per character (ASCII 48 + value),
    bit 0x20 = more characters follow, bit 0x10 of the last character = negative; from
    the fourth count on, the stored number is the difference to the count two before.
    """
    counts: list[int] = []
    position = 0
    while position < len(text):
        value = shift = 0
        while True:
            if position >= len(text):
                raise InvalidAnnotation("compressed RLE string ends in the middle of a count")
            code = ord(text[position]) - 48
            position += 1
            if not 0 <= code < 64:
                raise InvalidAnnotation(
                    f"character {text[position - 1]!r} is not in a compressed RLE"
                )
            value |= (code & 0x1F) << shift
            shift += 5
            if not code & 0x20:
                if code & 0x10:
                    value -= 1 << shift  # sign-extend the last 5-bit group
                break
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_decode(counts: Sequence[int], height: int, width: int) -> np.ndarray:
    """H×W bool mask from run lengths that alternate 0s and 1s (starting with 0s) over the
    pixels in column-major order, as COCO stores them."""
    runs = np.asarray(counts, dtype=np.int64)
    if runs.ndim != 1 or (runs < 0).any() or int(runs.sum()) != height * width:
        raise InvalidAnnotation(
            f"RLE counts must be non-negative and sum to {height}x{width} = {height * width}, "
            f"got {len(runs)} runs summing to {int(runs.sum()) if runs.ndim == 1 else '?'}"
        )
    values = (np.arange(len(runs)) % 2).astype(bool)
    return np.repeat(values, runs).reshape(width, height).T


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """H×W bool union of COCO polygons ``[x0, y0, x1, y1, ...]`` (pixel units, origin at
    the top-left corner of the top-left pixel); a pixel is inside when its centre is."""
    mask = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        points = np.asarray(polygon, dtype=np.float64)
        if points.ndim != 1 or len(points) % 2 or not np.isfinite(points).all():
            raise InvalidAnnotation("a polygon must be a flat list of finite x, y pairs")
        _fill_polygon(mask, points[0::2], points[1::2])
    return mask


def _fill_polygon(mask: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """OR the pixels whose centres lie inside polygon (x, y) (K vertices) into ``mask``."""
    height, width = mask.shape
    if len(x) < 3:
        return
    row_start = max(0, int(np.ceil(y.min() - 0.5)))
    row_stop = min(height, int(np.ceil(y.max() - 0.5)))
    if row_start >= row_stop:
        return
    x_next, y_next = np.roll(x, -1), np.roll(y, -1)
    centres = np.arange(row_start, row_stop, dtype=np.float64)[:, None] + 0.5  # R×1
    # half-open rule: an edge crosses the row centre c when min(y) <= c < max(y), so a
    # vertex on c counts once and horizontal edges never cross
    crosses = (centres >= np.minimum(y, y_next)) & (centres < np.maximum(y, y_next))  # R×K
    rows, edges = np.nonzero(crosses)
    t = (centres[rows, 0] - y[edges]) / (y_next[edges] - y[edges])
    x_cross = x[edges] + t * (x_next[edges] - x[edges])
    # column c (centre c + 0.5) is right of a crossing at x when c >= ceil(x - 0.5): each
    # crossing toggles inside/outside from that column on (even-odd rule)
    columns = np.clip(np.ceil(x_cross - 0.5), 0, width).astype(np.int64)
    toggles = np.zeros((row_stop - row_start, width + 1), dtype=np.int32)
    np.add.at(toggles, (rows, columns), 1)
    mask[row_start:row_stop] |= (np.cumsum(toggles[:, :width], axis=1) & 1).astype(bool)


def _load_coco_json(uri: str, required: tuple[str, ...]) -> dict[str, Any]:
    try:
        with open_uri(uri, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataFileMissing(
            f"COCO annotation file {uri} not found: check data.coco paths"
        ) from None
    if not isinstance(data, dict) or any(key not in data for key in required):
        raise DataError(f"{uri} is not a COCO annotation file: it needs the keys {list(required)}")
    return data


def _images_by_id(images: list[dict[str, Any]], uri: str) -> dict[Any, dict[str, Any]]:
    by_id: dict[Any, dict[str, Any]] = {}
    for image in images:
        if "id" not in image or "file_name" not in image:
            raise DataError(
                f"{uri}: every entry of 'images' needs 'id' and 'file_name', got {image}"
            )
        earlier = by_id.get(image["id"])
        if earlier is not None and earlier != image:  # which file would the captions be of?
            raise DataError(
                f"{uri}: image id {image['id']!r} is listed twice in 'images', as "
                f"{earlier['file_name']!r} and {image['file_name']!r}: give each image its own id"
            )
        by_id[image["id"]] = image  # an exact repeat of an entry is the same image
    return by_id


def _save_png_atomically(label_map: np.ndarray, path: Path) -> None:
    # a crash mid-write must not leave a half PNG under the final name
    with atomic_path(path) as temporary:
        Image.fromarray(label_map).save(temporary, format="PNG")
