"""The embed stage: pairs manifest -> feature store, incrementally and loss-free.

Two engines share the same decode function, model holders and writer:
- ``ray``: Ray Data streaming executor — decode in CPU tasks (uint8 numpy batches),
  models in a class-based actor pool (``ActorPoolStrategy``; CPUs/GPUs per actor in
  params), results streamed to the driver, which writes whole shards.
- ``local``: a single-process loop with a torch DataLoader for decoding (the benchmark
  baseline, and handy for tiny runs).

Incremental: uids already in complete shards (same feature spec) or rejected for good
are skipped; a transient reject (``read_timeout``, ``unavailable``) is tried again; a
changed spec (other models, weights or preprocessing) starts afresh.

Reproducible: rows are written in uid order (captions by uid, caption index), whatever
order the engine returns them in (:class:`ShardWriter`), and this run's rejects by uid, so
two runs over the same inputs write the same bytes (the same DVC hash of the folder).

Preprocessing comes from each model's own config: the backbone's mean, std,
interpolation and crop from timm's data config of the built model (``embed.interpolation``
overrides the interpolation when set), CLIP's from open_clip's preprocess config. The spec
records both (``spec["preprocessing"]``, see :mod:`dinoalign.embed.store`).
"""

from __future__ import annotations

import collections
import hashlib
import json
import time
from dataclasses import asdict
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dinoalign.ray_runtime import TorchThreads, init_ray, require_resources
from dinoalign.config import Params
from dinoalign.data.images import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_BYTES,
    DEFAULT_READ_ATTEMPTS,
    DEFAULT_READ_BACKOFF_S,
    DEFAULT_READ_TIMEOUT_S,
    TRANSIENT_REASONS,
    ImageRejected,
    load_image,
    resize_crop,
)
from dinoalign.data.schema import REJECTS_SCHEMA, make_caption_id
from dinoalign.embed.features import image_features
from dinoalign.embed.store import FeatureStore, vector_column
from dinoalign.errors import ConfigError

STAGE = "embed"
SCHEMA_VERSION = 1
HALF_COLUMNS = ("patches", "registers")  # token-level columns are stored in fp16


# ----------------------------------------------------------------------------- decode
def decode_batch(
    batch: dict[str, np.ndarray], *, img_size: int, interpolation: str, max_pixels: int, min_side: int,
    crop_pct: float = 1.0, crop_mode: str = "center",
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO, max_bytes: int = DEFAULT_MAX_BYTES,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S, read_attempts: int = DEFAULT_READ_ATTEMPTS,
    read_backoff_s: float = DEFAULT_READ_BACKOFF_S,
) -> dict[str, np.ndarray]:
    """uids + image URIs -> uint8 images N×S×S×3 (:func:`~dinoalign.data.images.resize_crop`:
    at crop_pct 1 and ``center``, short-side resize + centre crop) and a reject reason per
    row ("" when decoded). Never raises for a bad image."""
    uids = batch["uid"]
    images = np.zeros((len(uids), img_size, img_size, 3), dtype=np.uint8)
    reasons = np.full(len(uids), "", dtype=object)
    details = np.full(len(uids), "", dtype=object)
    for i, uri in enumerate(batch["image_uri"]):
        try:
            images[i] = resize_crop(
                load_image(str(uri), max_pixels=max_pixels, min_side=min_side,
                           max_aspect_ratio=max_aspect_ratio, max_bytes=max_bytes,
                           read_timeout_s=read_timeout_s, read_attempts=read_attempts,
                           read_backoff_s=read_backoff_s),
                img_size, interpolation,
                crop_pct, crop_mode,
            )
        except ImageRejected as e:
            reasons[i], details[i] = e.reason, e.detail
    return {"uid": uids, "image": images, "reject_reason": reasons, "reject_detail": details}


# ----------------------------------------------------------------------------- models
def _device(num_gpus: float) -> torch.device:
    if num_gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():  # Ray gave this actor a GPU that torch cannot use
        raise RuntimeError(
            f"embed.actor_num_gpus={num_gpus:g} but torch {torch.__version__} sees no CUDA device in the "
            "embed actor: install a CUDA build of torch that matches the driver, or set embed.actor_num_gpus=0"
        )
    return torch.device("cuda")


class ImageEmbedder:
    """Callable model holder (one per actor): decoded batch -> feature batch."""

    def __init__(self, params: Params) -> None:
        # backbones (timm, open_clip) are imported where a model is built, not at module
        # import: Ray Data's decode workers import this module and need neither
        from dinoalign.backbones.dinov2 import build_backbone_from

        cfg = params.embed
        self.threads = TorchThreads(cfg.torch_threads)
        self.device = _device(cfg.actor_num_gpus)
        self.backbone = build_backbone_from(params.backbone, params.seed).to(self.device)
        self.keep_patches = cfg.keep_patches
        self.clip = None
        if params.clip.image_features:
            from dinoalign.backbones.text import load_open_clip

            model, pre, _ = load_open_clip(params.clip.name, params.clip.pretrained)
            self.clip, self.clip_preprocess = model.eval().to(self.device), pre

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads()  # this call's thread (Ray actors run calls in an executor thread)
        t0 = time.perf_counter()
        ok = batch["reject_reason"] == ""
        n = len(batch["uid"])
        out: dict[str, np.ndarray] = {k: batch[k] for k in ("uid", "reject_reason", "reject_detail")}
        images = batch["image"][ok]
        feats: dict[str, np.ndarray] = {}
        if len(images):
            x = self.backbone.normalize(torch.from_numpy(images)).to(self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                res = image_features(self.backbone(x), keep_patches=self.keep_patches)
            feats = {k: v.float().cpu().numpy() for k, v in res.items()}
            if self.clip is not None:
                from dinoalign.backbones.text import to_clip_input

                clip_x = to_clip_input(images, self.clip_preprocess, self.device)
                feats["clip_image"] = self.clip.encode_image(clip_x, normalize=True).float().cpu().numpy()
        for k, v in feats.items():
            full = np.zeros((n, *v.shape[1:]), dtype=np.float16 if k in HALF_COLUMNS else np.float32)
            full[ok] = v
            out[k] = full
        out["model_seconds"] = np.full(n, (time.perf_counter() - t0) / max(n, 1))
        return out


class TextEmbedder:
    """Callable holder of the configured text encoders: captions -> text_<key> columns."""

    def __init__(self, params: Params) -> None:
        from dinoalign.backbones.text import build_text_encoder

        self.threads = TorchThreads(params.embed.torch_threads)
        self.encoders = {
            t.key: build_text_encoder(t.kind, t.name, pretrained=t.pretrained, model_kwargs=t.model_kwargs)
            for t in params.embed.text_encoders
        }
        self.batch_size = params.embed.text_batch_size

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads()
        texts = [str(t) for t in batch["caption"]]
        out = dict(batch)
        for key, enc in self.encoders.items():
            out[f"text_{key}"] = enc.encode(texts, batch_size=self.batch_size).float().cpu().numpy()
        return out


# ----------------------------------------------------------------------------- spec
def feature_spec(params: Params) -> dict[str, Any]:
    """What the features depend on. Builds each model once (cheap next to embedding) so
    that weight hashes, not just names, decide whether existing shards are reusable."""
    from dinoalign.backbones.dinov2 import backbone_preprocessing, build_backbone_from, state_hash
    from dinoalign.backbones.text import clip_image_size, clip_preprocessing

    backbone = build_backbone_from(params.backbone, params.seed)
    with torch.no_grad():
        s = params.embed.img_size
        out = backbone(torch.zeros(1, 3, s, s))
    d, h, p = out.cls.shape[-1], out.attn_logits.shape[1], out.patches.shape[1]
    columns: dict[str, list[int]] = {
        "cls": [d], "patch_mean": [d], "token_mean": [d], "head_embeddings": [h, d],
        "head_mean_embedding": [d],
    }
    if params.embed.keep_patches:
        columns["registers"] = [int(out.registers.shape[1]), d]
        columns["patches"] = [p, d]
    preprocessing = backbone_preprocessing(backbone, params.embed)
    spec: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "backbone": {**asdict(params.backbone), "weights_sha": state_hash(backbone),
                     "random_init": not params.backbone.pretrained and not params.backbone.weights,
                     "embed_dim": d, "num_heads": h, "grid": list(out.grid)},
        "img_size": s,
        "interpolation": preprocessing["interpolation"],
        "preprocessing": {"backbone": preprocessing, "clip": None},
        "dtype": "float32",
        "text_encoders": {},
    }
    if params.clip.image_features:
        from dinoalign.backbones.text import load_open_clip

        model, pre, _ = load_open_clip(params.clip.name, params.clip.pretrained)
        spec["clip"] = {**asdict(params.clip), "weights_sha": state_hash(model), "image_size": clip_image_size(pre)}
        spec["preprocessing"]["clip"] = clip_preprocessing(pre)
        size = spec["clip"]["image_size"]
        with torch.no_grad():
            columns["clip_image"] = [int(model.encode_image(torch.zeros(1, 3, size, size)).shape[-1])]
    text = TextEmbedder(params)
    for key, enc in text.encoders.items():
        tcfg = next(t for t in params.embed.text_encoders if t.key == key)
        spec["text_encoders"][key] = {**asdict(tcfg), "weights_sha": state_hash(enc), "width": int(enc.width)}
        columns[f"text_{key}"] = [int(enc.width)]
    spec["columns"] = columns
    spec["spec_hash"] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return spec


# ----------------------------------------------------------------------------- engines
def _ray_stream(
    rows: pa.Table, make_decode: Callable, params: Params, model_cls: type, batch_size: int, decode: bool,
    report: dict[str, Any],
) -> Iterator[dict[str, np.ndarray]]:
    """Streams the model's output batches; when exhausted, fills ``report`` with Ray Data's
    per-operator times (``operators``) and its own stats text (``stats_text``)."""
    import ray
    from ray.data import ActorPoolStrategy

    init_ray()
    cfg = params.embed
    require_resources(
        f"embed ({cfg.num_actors} model actor(s) of {cfg.actor_num_cpus:g} CPU, {cfg.actor_num_gpus:g} GPU)",
        {"CPU": cfg.actor_num_cpus, "GPU": cfg.actor_num_gpus}, cfg.num_actors,
        "lower embed.num_actors, embed.actor_num_cpus or embed.actor_num_gpus, or run on a cluster that has them "
        "(RAY_ADDRESS)",
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    n_blocks = max(1, min(len(rows) // max(cfg.decode_batch_size, 1), 64))
    ds = ray.data.from_arrow(rows).repartition(n_blocks)
    # rows come back in input order, so the writer's reorder buffer (ShardWriter) stays small
    ds.context.execution_options.preserve_order = True
    if decode:
        ds = ds.map_batches(make_decode, batch_size=cfg.decode_batch_size, batch_format="numpy",
                            num_cpus=cfg.decode_num_cpus)
    ds = ds.map_batches(
        model_cls, fn_constructor_args=(params,), batch_size=batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(size=cfg.num_actors), num_cpus=cfg.actor_num_cpus,
        num_gpus=cfg.actor_num_gpus,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    report["operators"] = ray_operator_times(ds)
    report["stats_text"] = ds.stats()


def ray_operator_times(ds: Any) -> dict[str, dict[str, float]]:
    """Per operator of an executed Ray Data dataset: ``wall_s`` and ``cpu_s`` (summed over
    its tasks or actor calls: the work it did), ``span_s`` (first start to last end) and
    ``rows`` (its output). Sub-operators (a repartition's split and reduce) are left out."""
    chain, pending = [], [ds.get_stats_summary()]
    while pending:  # each summary holds its last operators; earlier ones are in parents
        summary = pending.pop()
        chain.append(summary)
        pending.extend(summary.parents)
    out: dict[str, dict[str, float]] = {}
    for summary in reversed(chain):  # in pipeline order
        for op in summary.operators_stats:
            if op.is_sub_operator:
                continue
            out[op.operator_name] = {
                "wall_s": float(op.wall_time.sum) if op.wall_time else 0.0,
                "cpu_s": float(op.cpu_time.sum) if op.cpu_time else 0.0,
                "span_s": float(op.time_total_s or 0.0),
                "rows": float(op.output_num_rows.sum) if op.output_num_rows else 0.0,
            }
    return out


def _local_stream(
    rows: pa.Table, make_decode: Callable, params: Params, model_cls: type, batch_size: int, decode: bool,
    report: dict[str, Any],
) -> Iterator[dict[str, np.ndarray]]:
    """The plain loop: decode in DataLoader workers, the model in this process (``report``
    stays empty: the caller times the model itself)."""
    model = model_cls(params)
    cols = {c: np.asarray(rows.column(c).to_pylist(), dtype=object) for c in rows.column_names}
    chunks = [{c: v[i : i + batch_size] for c, v in cols.items()} for i in range(0, len(rows), batch_size)]
    if not decode:
        for chunk in chunks:
            yield model(chunk)
        return
    loader = torch.utils.data.DataLoader(
        chunks, batch_size=None, num_workers=params.embed.loader_workers, collate_fn=make_decode,
        prefetch_factor=2 if params.embed.loader_workers else None,
    )
    for decoded in loader:
        yield model(decoded)


ENGINES = {"ray": _ray_stream, "local": _local_stream}


class _Decode:
    """Picklable decode callable (Ray tasks and DataLoader workers)."""

    def __init__(self, params: Params, preprocessing: dict[str, Any]) -> None:
        """``preprocessing``: the spec's backbone preprocessing (interpolation and crop)."""
        self.kw = dict(img_size=params.embed.img_size, interpolation=preprocessing["interpolation"],
                       crop_pct=preprocessing["crop_pct"], crop_mode=preprocessing["crop_mode"],
                       max_pixels=params.data.max_pixels, min_side=params.data.min_side,
                       max_aspect_ratio=params.data.max_aspect_ratio,
                       max_bytes=params.data.max_bytes, read_timeout_s=params.data.read_timeout_s,
                       read_attempts=params.data.read_attempts, read_backoff_s=params.data.read_backoff_s)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return decode_batch(batch, **self.kw)


# ----------------------------------------------------------------------------- writer
class ShardWriter:
    """Writes streamed rows as whole shards of ``shard_rows``, in the order of ``keys``.

    Engines deliver rows in whatever order their workers finish (Ray Data's, today), so
    the writer puts them back in the planned order (the callers sort ``keys``): the same
    inputs give the same shards, byte for byte, and the same DVC hash. Every planned key
    arrives exactly once, as a row (:meth:`add`, keyed by its ``key`` column) or as a
    reject (:meth:`drop`); a row waits until every earlier key has arrived, and
    :meth:`close` raises if a key never did, so no row is lost without a trace."""

    def __init__(self, store: FeatureStore, kind: str, shard_rows: int, shapes: dict[str, list[int]],
                 string_cols: tuple[str, ...], key: str, keys: Sequence[str]) -> None:
        self.store, self.kind, self.shard_rows = store, kind, shard_rows
        self.shapes, self.string_cols, self.key = shapes, string_cols, key
        self.position = {k: i for i, k in enumerate(keys)}
        self.waiting: dict[int, dict[str, Any] | None] = {}  # arrived out of order; None: dropped
        self.next = 0  # position of the first key that has not arrived
        self.ready: list[dict[str, Any]] = []  # rows in order, fewer than shard_rows
        self.written = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Rows of one output batch (every column, one row per key)."""
        for i, k in enumerate(batch[self.key]):
            self._arrive(str(k), {c: v[i] for c, v in batch.items()})
        self._release()

    def drop(self, keys: Iterable[str]) -> None:
        """Planned keys that end as rejects, not rows."""
        for k in keys:
            self._arrive(str(k), None)
        self._release()

    def close(self) -> None:
        missing = len(self.position) - self.next
        if missing:
            first = next(k for k, i in self.position.items() if i == self.next)
            raise RuntimeError(
                f"embed: {missing} {self.kind} rows never came back from the engine (first: {first}); "
                "the shards written so far are kept: re-run embed to finish"
            )
        if self.ready:
            self._write()

    def _arrive(self, key: str, row: dict[str, Any] | None) -> None:
        pos = self.position.get(key)
        if pos is None or pos < self.next or pos in self.waiting:
            raise RuntimeError(f"embed: {self.kind} key {key} was not planned for this run or came back twice")
        self.waiting[pos] = row

    def _release(self) -> None:
        while self.next in self.waiting:
            row = self.waiting.pop(self.next)
            self.next += 1
            if row is not None:
                self.ready.append(row)
                if len(self.ready) == self.shard_rows:
                    self._write()

    def _write(self) -> None:
        rows, self.ready = self.ready, []
        arrays, names = [], []
        for c in self.string_cols:
            arrays.append(pa.array([str(r[c]) for r in rows], type=pa.string()))
            names.append(c)
        if "caption_index" in rows[0]:
            arrays.append(pa.array([int(r["caption_index"]) for r in rows], type=pa.int32()))
            names.append("caption_index")
        for c in self.shapes:
            if c in rows[0]:
                values = np.stack([r[c] for r in rows])
                arrays.append(vector_column(values, pa.float16() if c in HALF_COLUMNS else pa.float32()))
                names.append(c)
        self.store.write_shard(self.kind, pa.Table.from_arrays(arrays, names=names))
        self.written += len(rows)


# ----------------------------------------------------------------------------- driver
def run_embed(params: Params, manifest: pa.Table) -> dict[str, Any]:
    """Embed every manifest uid not yet embedded; return counts and throughput."""
    cfg = params.embed
    if cfg.engine not in ENGINES:
        raise ConfigError(f"embed.engine={cfg.engine!r}: choose one of {sorted(ENGINES)}")
    store = FeatureStore(params.paths.features)
    spec = feature_spec(params)
    # spec.json is written before any shard, so shards of a killed run are reusable
    # exactly when they were made with the same models and preprocessing.
    old = store.read_json("spec.json")
    if old is not None and old["spec_hash"] != spec["spec_hash"]:
        print(f"embed: feature spec changed ({old['spec_hash']} -> {spec['spec_hash']}): re-embedding all")
        store.clear()
    elif old is None and (store.shards("images") or store.shards("captions")):
        print("embed: shards without spec.json (unknown provenance): re-embedding all")
        store.clear()
    store.write_json("spec.json", spec)
    stream = ENGINES[cfg.engine]
    t_start = time.perf_counter()

    # ---- images
    done = store.keys("images", "uid")
    rejects = store.read_rejects()
    # a transient reject (a timeout, a 5xx) is not done: its uid is tried again, and this
    # run's outcome replaces its old row
    transient = pc.is_in(rejects.column("reason"), value_set=pa.array(sorted(TRANSIENT_REASONS)))
    rejected = set(rejects.filter(pc.invert(transient)).column("uid").to_pylist())
    manifest_uids = manifest.column("uid").to_pylist()
    todo_mask = [u not in done and u not in rejected for u in manifest_uids]
    todo = manifest.filter(pa.array(todo_mask)).select(["uid", "image_uri"]).sort_by("uid")
    in_todo = pc.is_in(rejects.column("uid"), value_set=todo.column("uid"))
    retried, rejects = rejects.filter(in_todo), rejects.filter(pc.invert(in_todo))
    image_shapes = {c: s for c, s in spec["columns"].items() if not c.startswith("text_")}
    writer = ShardWriter(store, "images", cfg.shard_rows, image_shapes, ("uid",), "uid",
                         todo.column("uid").to_pylist())
    new_rejects: list[dict[str, str]] = []
    model_seconds = 0.0
    t0 = time.perf_counter()
    image_report: dict[str, Any] = {}
    if len(todo):
        for batch in stream(todo, _Decode(params, spec["preprocessing"]["backbone"]), params, ImageEmbedder, cfg.batch_size, True, image_report):
            bad = batch["reject_reason"] != ""
            for i in np.flatnonzero(bad):
                new_rejects.append({"uid": str(batch["uid"][i]), "stage": STAGE, "reason": str(batch["reject_reason"][i]),
                                    "detail": str(batch["reject_detail"][i]), "key": ""})
            model_seconds += float(batch["model_seconds"].sum())
            writer.drop(batch["uid"][bad])
            writer.add({k: v[~bad] for k, v in batch.items() if k not in ("reject_reason", "reject_detail", "model_seconds")})
        writer.close()
        _save_rejects(store, rejects, new_rejects)
    t_images = time.perf_counter() - t0

    # ---- captions of every embedded image
    embedded = store.keys("images", "uid")
    done_captions = store.keys("captions", "caption_id")
    cap_rows = _caption_rows(manifest, embedded, done_captions)
    text_shapes = {c: s for c, s in spec["columns"].items() if c.startswith("text_")}
    cwriter = ShardWriter(store, "captions", cfg.shard_rows * 4, text_shapes, ("caption_id", "uid", "caption"),
                          "caption_id", cap_rows.column("caption_id").to_pylist())
    t0 = time.perf_counter()
    caption_report: dict[str, Any] = {}
    if len(cap_rows):
        for batch in stream(cap_rows, None, params, TextEmbedder, cfg.text_batch_size, False, caption_report):
            cwriter.add(batch)
        cwriter.close()
    t_captions = time.perf_counter() - t0

    entries = store.shard_entries()
    all_rejects = store.read_rejects()
    summary = {
        "images_embedded": writer.written,
        "captions_embedded": cwriter.written,
        "images_rejected": len(new_rejects),
        "images_rejected_transient": sum(r["reason"] in TRANSIENT_REASONS for r in new_rejects),
        "images_retried": retried.num_rows,
        "images_total": sum(e["rows"] for e in entries if e["kind"] == "images"),
        "captions_total": sum(e["rows"] for e in entries if e["kind"] == "captions"),
        "rejects_total": all_rejects.num_rows,
        "images_skipped": len(manifest_uids) - len(todo),
        "images_per_s": writer.written / t_images if writer.written else 0.0,
        "captions_per_s": cwriter.written / t_captions if cwriter.written else 0.0,
        "seconds_images": t_images,
        "seconds_captions": t_captions,
        "seconds_model": model_seconds,
        "seconds_total": time.perf_counter() - t_start,
        # Ray engine: {"images"|"captions": {operator: {wall_s, cpu_s, span_s, rows}}}
        "operators": {k: r["operators"] for k, r in (("images", image_report), ("captions", caption_report))
                      if "operators" in r},
        "ray_data_stats": "\n\n".join(r["stats_text"] for r in (image_report, caption_report) if "stats_text" in r),
    }
    store.write_json("manifest.json", {
        "spec": spec,
        "shards": entries,
        "counts": {k: summary[k] for k in ("images_total", "captions_total", "rejects_total")},
        "rejects_by_reason": dict(sorted(collections.Counter(all_rejects.column("reason").to_pylist()).items())),
    })
    return summary


def _save_rejects(store: FeatureStore, old: pa.Table, new: list[dict[str, str]]) -> None:
    # this run's rejects by uid, not in the engine's order: the same inputs, the same bytes
    new_table = pa.Table.from_pylist(sorted(new, key=lambda r: r["uid"]), schema=REJECTS_SCHEMA)
    store.write_rejects(pa.concat_tables([old.cast(REJECTS_SCHEMA), new_table]))


def _caption_rows(manifest: pa.Table, embedded: set[str], done: set[str]) -> pa.Table:
    uids, cids, idxs, texts = [], [], [], []
    for uid, caps in zip(manifest.column("uid").to_pylist(), manifest.column("captions").to_pylist()):
        if uid not in embedded:
            continue
        for i, cap in enumerate(caps):
            cid = make_caption_id(uid, i)
            if cid not in done:
                uids.append(uid)
                cids.append(cid)
                idxs.append(i)
                texts.append(cap)
    table = pa.table({"caption_id": cids, "uid": uids, "caption_index": pa.array(idxs, pa.int32()), "caption": texts})
    return table.sort_by([("uid", "ascending"), ("caption_index", "ascending")])
