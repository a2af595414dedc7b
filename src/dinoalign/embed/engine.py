"""The embed stage: pairs manifest -> feature store, incrementally and loss-free.

The work is keyed by **content**: every row records the sha256 of what it was computed
from (``content_sha256``: the image bytes, or the caption's UTF-8 text), and the pairs
manifest says what each uid holds now (``image_sha256``, recorded by prepare from the
bytes it validated; hashed here from the bytes read where prepare did not; captions hash
from their text). A row is live while its (key, hash) is the manifest's; the others are
stale (changed pixels or text, a uid gone from the pairs, an image now rejected) and are
retired first (:func:`retire`: a shard holding one is rewritten without it, its other
rows copied, not recomputed). The model and preprocessing are the feature spec's: a
changed spec re-embeds all.

The work is cut into **chunks** before anything runs: the uids without a live row, sorted,
in runs of ``embed.shard_rows`` (captions: of ``4 × shard_rows``). One chunk becomes
exactly one shard, named by the sha256 of its (key, content hash) pairs
(``part-<16 hex>.parquet``: a name says which contents a shard holds), holding its rows in
key order and, in the parquet metadata, the chunk's rejects. So:

- a shard is the unit of completion: it appears whole or not at all (temp + rename
  locally, one PUT on S3), with its rejects inside, so a killed run leaves complete chunks
  (and the temporary of a shard it was writing, which the next run removes first), and
  the next run plans the rest;
- chunk boundaries and names are a function of the uid order alone: an interrupted and
  resumed run writes the same files, byte for byte, as an uninterrupted one (transient
  rejects that are tried again form chunks of their own, after the others), and a chunk
  that Ray runs twice (a retried task on a lost node) rewrites the same bytes under the
  same name: never a duplicate row;
- the shards are written where the work is done. Two engines share the decode function,
  the model holders and the shard code:

  - ``ray``: Ray Data: decode in CPU tasks, models in a class-based actor pool
    (``ActorPoolStrategy``; CPUs, GPUs and custom resources per actor in params). With
    ``embed.write: workers`` each actor writes its shards to ``paths.features`` (a path
    every node sees, or ``s3://``) and sends the driver a few hundred bytes per shard;
    with ``driver`` it sends the encoded shard and the driver writes it (a features
    path only the driver can reach);
  - ``local``: one process, a torch DataLoader decoding chunks in worker processes (the
    benchmark baseline, and handy for tiny runs).

The driver writes ``spec.json`` first and, at the end, ``rejects.parquet`` (from the
shards' rejects) and ``manifest.json`` from what is in storage: every listed shard with
its row count, size and sha256 (reported by the worker that wrote it, kept from the last
manifest when the size is unchanged, read otherwise).

Incremental: uids whose content is in a complete shard of the same feature spec, or was
rejected for good, are skipped; a transient reject (``read_timeout``, ``unavailable``) is
tried again; changed content is embedded again and its old row retired; a changed spec
(other models, weights or preprocessing) starts afresh, and so does a store written
before content hashes (its rows do not say what they were made from).

Preprocessing comes from each model's own config: the backbone's mean, std,
interpolation and crop from timm's data config of the built model (``embed.interpolation``
overrides the interpolation when set), CLIP's from open_clip's preprocess config. The spec
records both (``spec["preprocessing"]``, see :mod:`dinoalign.embed.store`).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import resource
import sys
import time
from dataclasses import asdict
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dinoalign.config import BackboneConfig, ClipConfig, EmbedConfig, TextEncoderConfig
from dinoalign.data.images import TRANSIENT_REASONS, ImageRejected, image_sha256, load_image_sha256, resize_crop
from dinoalign.data.schema import REJECTS_SCHEMA, make_caption_id
from dinoalign.embed.features import image_features
from dinoalign.embed.store import CONTENT_COLUMN, KINDS, FeatureStore, ShardContent, ShardReport, vector_column
from dinoalign.errors import ConfigError
from dinoalign.ray_runtime import TorchThreads, init_ray, require_resources
from dinoalign.storage import model_name_at_root, remove_temporaries, under_root

STAGE = "embed"
SCHEMA_VERSION = 2  # 2: head_mean_embedding is the official averaged-attention embedding
HALF_COLUMNS = ("patches", "registers")  # token-level columns are stored in fp16
CAPTION_CHUNK_FACTOR = 4  # a caption shard holds 4 × shard_rows rows (captions are small)



# ----------------------------------------------------------------------------- the job
@dataclasses.dataclass(frozen=True)
class EmbedJob:
    """Everything an embed worker needs, and nothing else: Ray ships it to every actor
    and decode task, so it holds configs and plain values, never a model or a ``Params``."""

    embed: EmbedConfig
    backbone: BackboneConfig
    clip: ClipConfig
    text_encoders: tuple[TextEncoderConfig, ...]
    limits: Mapping[str, Any]  # data.images.image_limits of the data section
    seed: int
    features: str  # the feature store: a path every worker sees, or s3://
    # the checkout, against which a relative backbone.weights file and a relative
    # ``local-dir:`` CLIP or text tower are read (the actors do not run in it); the spec
    # records them as params give them
    root: str | None = None

    @property
    def backbone_at_root(self) -> BackboneConfig:
        """The backbone section with a relative weights file resolved against ``root``."""
        return self.backbone.at_root(self.root)



# ----------------------------------------------------------------------------- plan
@dataclasses.dataclass(frozen=True)
class Chunk:
    """One planned shard: its file name and its rows (columns of equal length, in key order)."""

    kind: str  # images | captions
    name: str
    columns: Mapping[str, list[Any]]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def as_row(self) -> dict[str, str]:
        """The chunk as one Ray Data row (the columns as JSON: a chunk is a unit, not rows)."""
        return {"kind": self.kind, "shard": self.name, "payload": json.dumps(dict(self.columns))}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Chunk:
        return cls(str(row["kind"]), str(row["shard"]), json.loads(row["payload"]))


def shard_name(keys: Sequence[str]) -> str:
    """``part-<16 hex>.parquet``: the sha256 of the chunk's keys, one per line."""
    return f"part-{hashlib.sha256(chr(10).join(keys).encode()).hexdigest()[:16]}.parquet"


def content_key(key: str, sha256: str) -> str:
    """What names a row in a shard name: its key and the hash of its content."""
    return f"{key} {sha256}"


def plan_chunks(kind: str, table: pa.Table, key: str, size: int) -> list[Chunk]:
    """``table`` (in the order the caller sorted it) in runs of ``size`` rows, one chunk
    each, named by its ``key`` column (:func:`shard_name`), each key with its content hash
    (:func:`content_key`) when the table has a ``content_sha256`` column."""
    if size < 1:
        raise ConfigError(f"embed.shard_rows must be >= 1, got {size}")
    cols = {c: table.column(c).to_pylist() for c in table.column_names}
    chunks = []
    for start in range(0, table.num_rows, size):
        part = {c: v[start : start + size] for c, v in cols.items()}
        keys = part[key] if CONTENT_COLUMN not in part else [
            content_key(k, h) for k, h in zip(part[key], part[CONTENT_COLUMN])]
        chunks.append(Chunk(kind, shard_name(keys), part))
    return chunks


# ----------------------------------------------------------------------------- decode
def decode_batch(
    batch: Mapping[str, Any], *, img_size: int, interpolation: str, crop_pct: float = 1.0,
    crop_mode: str = "center", **limits: Any,
) -> dict[str, np.ndarray]:
    """uids + image URIs -> uint8 images N×S×S×3 (:func:`~dinoalign.data.images.resize_crop`:
    at crop_pct 1 and ``center``, short-side resize + centre crop), a reject reason per
    row ("" when decoded) and the sha256 of the bytes decoded (``content_sha256``, "" for
    a reject). ``limits``: :func:`~dinoalign.data.images.image_limits`. Never raises for a
    bad image."""
    uids = list(batch["uid"])
    images = np.zeros((len(uids), img_size, img_size, 3), dtype=np.uint8)
    reasons = np.full(len(uids), "", dtype=object)
    details = np.full(len(uids), "", dtype=object)
    hashes = np.full(len(uids), "", dtype=object)
    for i, uri in enumerate(batch["image_uri"]):
        try:
            pixels, hashes[i] = load_image_sha256(str(uri), **limits)
            images[i] = resize_crop(pixels, img_size, interpolation, crop_pct, crop_mode)
        except ImageRejected as e:
            reasons[i], details[i] = e.reason, e.detail
    return {"uid": np.asarray(uids, dtype=object), "image": images, "reject_reason": reasons,
            "reject_detail": details, CONTENT_COLUMN: hashes}


class DecodeChunk:
    """Picklable: an image chunk row -> the same row with its pixels (``images``: the
    N×S×S×3 uint8 bytes) and the reject reason of each uid (Ray tasks, DataLoader workers)."""

    def __init__(self, job: EmbedJob, preprocessing: Mapping[str, Any]) -> None:
        """``preprocessing``: the spec's backbone preprocessing (interpolation and crop)."""
        self.kw = dict(img_size=job.embed.img_size, interpolation=preprocessing["interpolation"],
                       crop_pct=preprocessing["crop_pct"], crop_mode=preprocessing["crop_mode"], **job.limits)

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        chunk = Chunk.from_row(row)
        out = decode_batch(chunk.columns, **self.kw)
        payload = {"uid": list(chunk.columns["uid"]), "reason": [str(r) for r in out["reject_reason"]],
                   "detail": [str(d) for d in out["reject_detail"]],
                   # what the pixels were made from, and what the plan expected (rejects keep that)
                   "read_sha256": [str(h) for h in out[CONTENT_COLUMN]],
                   "planned_sha256": list(chunk.columns.get(CONTENT_COLUMN, [""] * len(chunk)))}
        return {"kind": chunk.kind, "shard": chunk.name, "payload": json.dumps(payload),
                "images": out["image"].tobytes()}


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
    """Model holder of the image towers: decoded batch -> feature batch (one per actor)."""

    def __init__(self, job: EmbedJob) -> None:
        # backbones (timm, open_clip) are imported where a model is built, not at module
        # import: Ray Data's decode workers import this module and need neither
        from dinoalign.backbones.dinov2 import build_backbone_from

        self.threads = TorchThreads(job.embed.torch_threads)
        self.device = _device(job.embed.actor_num_gpus)
        self.backbone = build_backbone_from(job.backbone_at_root, job.seed).to(self.device)
        self.keep_patches = job.embed.keep_patches
        self.clip = None
        if job.clip.image_features:
            from dinoalign.backbones.text import load_open_clip

            model, pre, _ = load_open_clip(model_name_at_root(job.clip.name, job.root), job.clip.pretrained)
            self.clip, self.clip_preprocess = model.eval().to(self.device), pre

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``uid``, ``image`` (N×S×S×3 uint8), ``reject_reason`` -> ``uid``, the reject
        columns, one array per feature column (zeros for rejected rows) and
        ``model_seconds`` (per row)."""
        self.threads()  # this call's thread (Ray actors run calls in an executor thread)
        t0 = time.perf_counter()
        ok = np.asarray(batch["reject_reason"]) == ""
        n = len(batch["uid"])
        out: dict[str, np.ndarray] = {k: np.asarray(batch[k]) for k in ("uid", "reject_reason", "reject_detail")}
        images = batch["image"][ok]
        feats: dict[str, np.ndarray] = {}
        if len(images):
            x = self.backbone.normalize(torch.from_numpy(np.ascontiguousarray(images))).to(self.device)
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
    """Model holder of the configured text encoders: captions -> text_<key> columns."""

    def __init__(self, job: EmbedJob) -> None:
        from dinoalign.backbones.text import build_text_encoder

        self.threads = TorchThreads(job.embed.torch_threads)
        self.encoders = {
            t.key: build_text_encoder(t.kind, model_name_at_root(t.name, job.root), pretrained=t.pretrained,
                                      model_kwargs=t.model_kwargs)
            for t in job.text_encoders
        }
        self.batch_size = job.embed.text_batch_size

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        self.threads()
        texts = [str(t) for t in batch["caption"]]
        out = dict(batch)
        for key, enc in self.encoders.items():
            out[f"text_{key}"] = enc.encode(texts, batch_size=self.batch_size).float().cpu().numpy()
        return out


# ----------------------------------------------------------------------------- shards
def _node_id() -> str:
    """The Ray node this runs on ("local" outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # Ray missing or a context without a node: not worth failing a shard
        pass
    return "local"


def feature_table(rows: Mapping[str, Any], feats: Mapping[str, np.ndarray], shapes: Mapping[str, list[int]],
                  string_cols: Sequence[str]) -> pa.Table:
    """A shard's table: ``string_cols`` (and ``caption_index``) from ``rows``, then every
    column of ``shapes`` that ``feats`` has, as fixed-size lists (fp16 for token columns)."""
    arrays, names = [], []
    for c in string_cols:
        arrays.append(pa.array([str(v) for v in rows[c]], type=pa.string()))
        names.append(c)
    if "caption_index" in rows:
        arrays.append(pa.array([int(v) for v in rows["caption_index"]], type=pa.int32()))
        names.append("caption_index")
    n = len(rows[string_cols[0]])
    for c, shape in shapes.items():
        if c in feats:
            values = np.asarray(feats[c]).reshape(n, *shape)
            arrays.append(vector_column(values, pa.float16() if c in HALF_COLUMNS else pa.float32()))
            names.append(c)
    return pa.Table.from_arrays(arrays, names=names)


class _ShardWorker:
    """A chunk in, one shard out: written here (``embed.write: workers``) or sent back
    encoded (``driver``). Returns the shard's report as one small row."""

    def __init__(self, job: EmbedJob, spec: Mapping[str, Any], write_here: bool) -> None:
        self.store = FeatureStore(job.features)
        self.write_here = write_here
        self.batch_size = job.embed.batch_size
        self.spec = spec

    def _finish(self, kind: str, name: str, table: pa.Table, rejects: list[dict[str, str]],
                seconds: float) -> dict[str, Any]:
        data = FeatureStore.encode_shard(table, rejects)
        report = ShardReport.of(kind, name, data, table.num_rows, rejects)
        if self.write_here:
            self.store.put_shard(kind, name, data)
        return {**report.as_row(), "node": _node_id(), "model_seconds": seconds,
                "data": b"" if self.write_here else data}


class ImageShards(_ShardWorker):
    """Decoded image chunk -> image shard (uid + feature columns; rejects in its metadata)."""

    def __init__(self, job: EmbedJob, spec: Mapping[str, Any], write_here: bool) -> None:
        super().__init__(job, spec, write_here)
        self.model = ImageEmbedder(job)
        self.img_size = job.embed.img_size
        self.shapes = {c: s for c, s in spec["columns"].items() if not c.startswith("text_")}

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        meta = json.loads(row["payload"])
        uids, reasons, details = meta["uid"], meta["reason"], meta["detail"]
        s = self.img_size
        images = np.frombuffer(row["images"], dtype=np.uint8).reshape(len(uids), s, s, 3)
        ok = [i for i, r in enumerate(reasons) if not r]
        parts, seconds = [], 0.0
        for start in range(0, len(ok), self.batch_size):
            idx = ok[start : start + self.batch_size]
            out = self.model({"uid": np.asarray([uids[i] for i in idx], dtype=object), "image": images[idx],
                              "reject_reason": np.full(len(idx), "", dtype=object),
                              "reject_detail": np.full(len(idx), "", dtype=object)})
            seconds += float(out["model_seconds"].sum())
            parts.append(out)
        feats = {c: np.concatenate([p[c] for p in parts]) for c in self.shapes if parts and c in parts[0]}
        # a row records the hash of the bytes it was computed from; a reject, the hash planned
        # (the hash of the bytes read where none was planned: "" when none could be read)
        read, planned = meta["read_sha256"], meta["planned_sha256"]
        table = feature_table({"uid": [uids[i] for i in ok], CONTENT_COLUMN: [read[i] for i in ok]}, feats,
                              self.shapes, ("uid", CONTENT_COLUMN))
        rejects = [{"uid": uids[i], "stage": STAGE, "reason": reasons[i], "detail": details[i], "key": "",
                    CONTENT_COLUMN: planned[i] or read[i]} for i, r in enumerate(reasons) if r]
        return self._finish("images", str(row["shard"]), table, rejects, seconds)


class CaptionShards(_ShardWorker):
    """Caption chunk -> caption shard (caption_id, uid, caption_index, caption, text_<key>)."""

    def __init__(self, job: EmbedJob, spec: Mapping[str, Any], write_here: bool) -> None:
        super().__init__(job, spec, write_here)
        self.model = TextEmbedder(job)
        self.shapes = {c: s for c, s in spec["columns"].items() if c.startswith("text_")}

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        chunk = Chunk.from_row(row)
        t0 = time.perf_counter()
        feats = self.model(chunk.columns)
        table = feature_table(chunk.columns, feats, self.shapes, ("caption_id", "uid", "caption", CONTENT_COLUMN))
        return self._finish("captions", chunk.name, table, [], time.perf_counter() - t0)


# ----------------------------------------------------------------------------- spec
def feature_spec(job: EmbedJob) -> dict[str, Any]:
    """What the features depend on. Builds each model once (cheap next to embedding) so
    that weight hashes, not just names, decide whether existing shards are reusable."""
    from dinoalign.backbones.dinov2 import backbone_preprocessing, build_backbone_from, state_hash
    from dinoalign.backbones.text import clip_image_size, clip_preprocessing
    from dinoalign.config import describe_backbone

    backbone = build_backbone_from(job.backbone_at_root, job.seed)
    with torch.no_grad():
        s = job.embed.img_size
        out = backbone(torch.zeros(1, 3, s, s))
    d, h, p = out.cls.shape[-1], out.attn_logits.shape[1], out.patches.shape[1]
    columns: dict[str, list[int]] = {
        "cls": [d], "patch_mean": [d], "token_mean": [d], "head_embeddings": [h, d],
        "head_mean_embedding": [d],
    }
    if job.embed.keep_patches:
        columns["registers"] = [int(out.registers.shape[1]), d]
        columns["patches"] = [p, d]
    preprocessing = backbone_preprocessing(backbone, job.embed)
    spec: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "backbone": {**asdict(job.backbone), "weights_sha": state_hash(backbone),
                     "random_init": not job.backbone.pretrained and not job.backbone.weights,
                     "description": describe_backbone(job.backbone, job.root),
                     "embed_dim": d, "num_heads": h, "grid": list(out.grid)},
        "img_size": s,
        "interpolation": preprocessing["interpolation"],
        "preprocessing": {"backbone": preprocessing, "clip": None},
        "dtype": "float32",
        "text_encoders": {},
    }
    if job.clip.image_features:
        from dinoalign.backbones.text import load_open_clip

        model, pre, _ = load_open_clip(model_name_at_root(job.clip.name, job.root), job.clip.pretrained)
        spec["clip"] = {**asdict(job.clip), "weights_sha": state_hash(model), "image_size": clip_image_size(pre)}
        spec["preprocessing"]["clip"] = clip_preprocessing(pre)
        size = spec["clip"]["image_size"]
        with torch.no_grad():
            columns["clip_image"] = [int(model.encode_image(torch.zeros(1, 3, size, size)).shape[-1])]
    text = TextEmbedder(job)
    for key, enc in text.encoders.items():
        tcfg = next(t for t in job.text_encoders if t.key == key)
        spec["text_encoders"][key] = {**asdict(tcfg), "weights_sha": state_hash(enc), "width": int(enc.width)}
        columns[f"text_{key}"] = [int(enc.width)]
    spec["columns"] = columns
    spec["spec_hash"] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return spec


# ----------------------------------------------------------------------------- engines
def _ray_stream(chunks: list[Chunk], decode: DecodeChunk | None, worker: type, job: EmbedJob,
                spec: Mapping[str, Any], report: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Each chunk through Ray Data (decode tasks, then the actor pool); yields the shard
    reports as they finish and, when exhausted, fills ``report`` with Ray Data's
    per-operator times (``operators``) and its stats text (``stats_text``)."""
    import ray
    from ray.data import ActorPoolStrategy

    init_ray()
    cfg = job.embed
    per_actor = {"CPU": cfg.actor_num_cpus, "GPU": cfg.actor_num_gpus, **cfg.actor_resources}
    require_resources(
        f"embed ({cfg.num_actors} model actor(s) of "
        + ", ".join(f"{v:g} {k}" for k, v in per_actor.items() if v) + ")",
        per_actor, cfg.num_actors,
        "lower embed.num_actors, embed.actor_num_cpus, embed.actor_num_gpus or embed.actor_resources, "
        "or run on a cluster that has them (RAY_ADDRESS)",
    )
    ds = ray.data.from_items([c.as_row() for c in chunks], override_num_blocks=len(chunks))
    if decode is not None:
        ds = ds.map(decode, num_cpus=cfg.decode_num_cpus)
    extra = {"resources": dict(cfg.actor_resources)} if cfg.actor_resources else {}
    ds = ds.map(worker, fn_constructor_args=(job, spec, cfg.write == "workers"),
                compute=ActorPoolStrategy(size=cfg.num_actors), num_cpus=cfg.actor_num_cpus,
                num_gpus=cfg.actor_num_gpus, **extra)
    yield from ds.iter_rows()
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


def _local_stream(chunks: list[Chunk], decode: DecodeChunk | None, worker: type, job: EmbedJob,
                  spec: Mapping[str, Any], report: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The plain loop: decode chunks in DataLoader workers, the models in this process
    (``report`` stays empty: the caller times the model itself)."""
    work = worker(job, spec, job.embed.write == "workers")  # driver: the shard comes back encoded
    rows = [c.as_row() for c in chunks]
    if decode is None:
        for row in rows:
            yield work(row)
        return
    loader = torch.utils.data.DataLoader(
        rows, batch_size=None, num_workers=job.embed.loader_workers, collate_fn=decode,
        prefetch_factor=2 if job.embed.loader_workers else None,
    )
    for decoded in loader:
        yield work(decoded)


ENGINES = {"ray": _ray_stream, "local": _local_stream}


# ----------------------------------------------------------------------------- driver
class _Progress:
    """One line per tenth of the shards of a phase (a log stays short whatever the size)."""

    def __init__(self, kind: str, total: int) -> None:
        self.kind, self.total, self.done, self.rows, self.t0 = kind, total, 0, 0, time.perf_counter()
        self.next = max(1, total // 10)

    def __call__(self, rows: int) -> None:
        self.done += 1
        self.rows += rows
        if self.done >= self.next or self.done == self.total:
            rate = self.rows / max(time.perf_counter() - self.t0, 1e-9)
            print(f"embed: {self.kind} {self.done}/{self.total} shards, {self.rows} rows ({rate:.1f}/s)",
                  file=sys.stderr, flush=True)
            self.next = self.done + max(1, self.total // 10)


def _run_phase(chunks: list[Chunk], decode: DecodeChunk | None, worker: type, job: EmbedJob,
               spec: Mapping[str, Any], store: FeatureStore, reports: dict[str, ShardReport],
               nodes: collections.Counter[str], ops: dict[str, Any]) -> tuple[int, float]:
    """Run one phase's chunks; collect each shard's report (writing it when it came back
    encoded); return (rows written, model seconds)."""
    if not chunks:
        return 0, 0.0
    rows, model_seconds = 0, 0.0
    progress = _Progress(chunks[0].kind, len(chunks))
    planned = {c.name for c in chunks}
    for out in ENGINES[job.embed.engine](chunks, decode, worker, job, spec, ops):
        report = ShardReport.from_row(out)
        if report.name not in planned or report.name in reports:
            raise RuntimeError(f"embed: shard {report.name} was not planned for this run or came back twice")
        if out.get("data"):  # embed.write: driver
            store.put_shard(report.kind, report.name, bytes(out["data"]))
        reports[report.name] = report
        nodes[str(out["node"])] += 1
        rows += report.rows
        model_seconds += float(out["model_seconds"])
        progress(report.rows)
    missing = planned - reports.keys()
    if missing:
        raise RuntimeError(
            f"embed: {len(missing)} {chunks[0].kind} shards never came back from the engine (first: "
            f"{sorted(missing)[0]}); the shards written so far are kept: re-run embed to finish"
        )
    return rows, model_seconds


def run_embed(job: EmbedJob, manifest: pa.Table) -> dict[str, Any]:
    """Embed every manifest uid (and caption) whose content is not yet embedded, retire
    the rows whose content is no longer in the manifest; return counts and throughput."""
    cfg = job.embed
    if cfg.engine not in ENGINES:
        raise ConfigError(f"embed.engine={cfg.engine!r}: choose one of {sorted(ENGINES)}")
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    store = FeatureStore(job.features)
    if store.local:
        remove_temporaries(store.root)  # of a killed run (S3 has none: a PUT is whole or absent)
    spec = feature_spec(job)
    # spec.json is written before any shard, so shards of a killed run are reusable
    # exactly when they were made with the same models and preprocessing.
    old = store.read_json("spec.json")
    if old is not None and old["spec_hash"] != spec["spec_hash"]:
        print(f"embed: feature spec changed ({old['spec_hash']} -> {spec['spec_hash']}): re-embedding all")
        store.clear()
    elif old is None and (store.shards("images") or store.shards("captions")):
        print("embed: shards without spec.json (unknown provenance): re-embedding all")
        store.clear()
    contents = {"images": store.contents("images", "uid"), "captions": store.contents("captions", "caption_id")}
    if any(not c.hashed for kind in KINDS for c in contents[kind]):
        # never trusted: nothing records what the rows were computed from
        print(f"embed: the features at {job.features} predate content hashes (no {CONTENT_COLUMN} column): "
              "re-embedding all once")
        store.clear()
        contents = {"images": [], "captions": []}
    store.write_json("spec.json", spec)
    if job.root is not None:  # repo-relative image paths, read where the workers run (not in the checkout)
        uris = [under_root(u, job.root) for u in manifest.column("image_uri").to_pylist()]
        manifest = manifest.set_column(manifest.column_names.index("image_uri"), "image_uri",
                                       pa.array(uris, pa.string()))
    t_start = time.perf_counter()
    reports: dict[str, ShardReport] = {}
    nodes: collections.Counter[str] = collections.Counter()

    # ---- images: retire rows whose bytes changed or whose uid left the pairs, then plan
    # what has no live row and no live permanent reject
    manifest_uids = manifest.column("uid").to_pylist()
    want, hashed_here = image_content(manifest, job.limits, {k for c in contents["images"] for k, _ in c.rows})
    images = retire(store, "images", contents["images"], want)
    rejected = _latest_rejects(images.rejects, images.live)
    transient = {u for u, r in rejected.items() if r["reason"] in TRANSIENT_REASONS}
    todo_uids, todo_uris = [], []
    for u, uri in zip(manifest_uids, manifest.column("image_uri").to_pylist()):
        if u not in images.live and (u not in rejected or u in transient):
            todo_uids.append(u)
            todo_uris.append(uri)
    todo = pa.table({"uid": pa.array(todo_uids, pa.string()), "image_uri": pa.array(todo_uris, pa.string()),
                     CONTENT_COLUMN: pa.array([want[u] or "" for u in todo_uids], pa.string())}).sort_by("uid")
    retry = pc.is_in(todo.column("uid"), value_set=pa.array(sorted(transient), pa.string()))
    # retried uids form chunks of their own: the others keep the boundaries of a first run
    chunks = (plan_chunks("images", todo.filter(pc.invert(retry)), "uid", cfg.shard_rows)
              + plan_chunks("images", todo.filter(retry), "uid", cfg.shard_rows))
    t0 = time.perf_counter()
    image_ops: dict[str, Any] = {}
    images_written, model_seconds = _run_phase(
        chunks, DecodeChunk(job, spec["preprocessing"]["backbone"]), ImageShards, job, spec, store, reports,
        nodes, image_ops)
    t_images = time.perf_counter() - t0
    new_rejects = [r for c in chunks for r in reports[c.name].rejects]

    # ---- captions of every embedded image: retire those whose text changed or whose
    # image is gone or rejected, then plan the captions with no live row
    embedded = images.live | {u for c in chunks for u in c.columns["uid"]} - {r["uid"] for r in new_rejects}
    cap_rows = _caption_rows(manifest, embedded)
    want_caps = dict(zip(cap_rows.column("caption_id").to_pylist(), cap_rows.column(CONTENT_COLUMN).to_pylist()))
    captions = retire(store, "captions", contents["captions"], want_caps)
    cap_todo = cap_rows.filter(pc.invert(pc.is_in(cap_rows.column("caption_id"),
                                                  value_set=pa.array(sorted(captions.live), pa.string()))))
    cap_chunks = plan_chunks("captions", cap_todo, "caption_id", cfg.shard_rows * CAPTION_CHUNK_FACTOR)
    t0 = time.perf_counter()
    caption_ops: dict[str, Any] = {}
    captions_written, _ = _run_phase(cap_chunks, None, CaptionShards, job, spec, store, reports, nodes, caption_ops)
    t_captions = time.perf_counter() - t0

    # ---- what is in storage: rejects and the manifest
    final = store.contents("images", "uid")
    all_rejects = _rejects_table(_latest_rejects([r for c in final for r in c.rejects],
                                                 {k for c in final for k, _ in c.rows}))
    store.write_rejects(all_rejects)
    entries = store.shard_entries({**images.reports, **captions.reports, **reports}, previous=store.read_manifest())
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    summary = {
        "images_embedded": images_written,
        "captions_embedded": captions_written,
        "images_rejected": len(new_rejects),
        "images_rejected_transient": sum(r["reason"] in TRANSIENT_REASONS for r in new_rejects),
        "images_retried": int(pc.sum(retry.cast(pa.int64())).as_py() or 0),
        "images_total": sum(e["rows"] for e in entries if e["kind"] == "images"),
        "captions_total": sum(e["rows"] for e in entries if e["kind"] == "captions"),
        "rejects_total": all_rejects.num_rows,
        "images_skipped": len(manifest_uids) - len(todo),  # unchanged: a live row or a permanent reject
        # planned again because their bytes changed since they were embedded (or rejected)
        "images_changed": len(images.changed & set(todo_uids)),
        "images_retired": images.retired,  # stale rows removed (changed bytes, uid gone from the pairs)
        "images_hashed_here": hashed_here,  # hashed by embed: the pairs manifest had no image_sha256
        "captions_skipped": cap_rows.num_rows - cap_todo.num_rows,
        "captions_changed": len(captions.changed & set(cap_todo.column("caption_id").to_pylist())),
        "captions_retired": captions.retired,
        "images_per_s": images_written / t_images if images_written else 0.0,
        "captions_per_s": captions_written / t_captions if captions_written else 0.0,
        "shards_written": len(reports),
        "nodes_used": len(nodes),
        "nodes": dict(sorted(nodes.items())),  # Ray node id -> shards written there
        "seconds_images": t_images,
        "seconds_captions": t_captions,
        "seconds_model": model_seconds,
        "seconds_total": time.perf_counter() - t_start,
        # this process only: what a driver pod pays (workers are other processes)
        "driver_cpu_s": (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime),
        # Ray engine: {"images"|"captions": {operator: {wall_s, cpu_s, span_s, rows}}}
        "operators": {k: r["operators"] for k, r in (("images", image_ops), ("captions", caption_ops))
                      if "operators" in r},
        "ray_data_stats": "\n\n".join(r["stats_text"] for r in (image_ops, caption_ops) if "stats_text" in r),
    }
    store.write_json("manifest.json", {
        "spec": spec,
        "shards": entries,
        "counts": {k: summary[k] for k in ("images_total", "captions_total", "rejects_total")},
        "rejects_by_reason": dict(sorted(collections.Counter(all_rejects.column("reason").to_pylist()).items())),
    })
    return summary


# ----------------------------------------------------------------------------- content
def caption_sha256(text: str) -> str:
    """A caption's content hash: the sha256 of its UTF-8 text (its row is keyed by
    caption_id, which names the uid and the caption's index)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def image_content(manifest: pa.Table, limits: Mapping[str, Any], stored: set[str],
                  threads: int = 8) -> tuple[dict[str, str | None], int]:
    """uid -> sha256 of its image bytes: the manifest's ``image_sha256`` (prepare hashed
    what it validated). Without one (``prepare.validate_images`` false, or pairs prepared
    before content hashes), a uid with a ``stored`` row is read and hashed here, to know
    whether its row still holds ("" when unreadable: the row is retired, the uid planned
    and its decode says why); any other is None: unknown, embedded if new (its row records
    the hash of the bytes decoded) and, if rejected for good, not read again. Returns the
    map and how many were hashed here."""
    uids = manifest.column("uid").to_pylist()
    known = (manifest.column("image_sha256").to_pylist() if "image_sha256" in manifest.column_names
             else [None] * len(uids))
    out: dict[str, str | None] = dict(zip(uids, known))
    missing = [(u, uri) for u, uri, h in zip(uids, manifest.column("image_uri").to_pylist(), known)
               if not h and u in stored]
    if missing:
        print(f"embed: hashing {len(missing)} embedded image(s) the pairs manifest has no image_sha256 for "
              "(prepare.validate_images false, or pairs prepared before content hashes)", file=sys.stderr)

        def read(uri: str) -> str:
            try:
                return image_sha256(uri, **limits)
            except ImageRejected:
                return ""

        with cf.ThreadPoolExecutor(max_workers=threads) as pool:
            for (u, _), h in zip(missing, pool.map(read, [uri for _, uri in missing])):
                out[u] = h
    return out, len(missing)


@dataclasses.dataclass
class Retired:
    """A kind's store after :func:`retire`: the keys with a live row, the live rejects,
    the keys whose stale row or reject had another hash (changed content), how many stale
    rows were removed and the reports of the shards rewritten without them."""

    live: set[str]
    rejects: list[dict[str, str]]
    changed: set[str]
    retired: int
    reports: dict[str, ShardReport]


def retire(store: FeatureStore, kind: str, shards: Sequence[ShardContent], want: Mapping[str, str | None]) -> Retired:
    """Remove every stale row and reject of ``kind`` (its key's content hash is not
    ``want[key]``, or its key is not in ``want``; a reject of a key whose hash is unknown,
    None, is kept). A shard holding one is rewritten
    without it, the other rows copied as stored (never recomputed), under the name of
    the (key, hash) pairs it keeps, in key order (the new shard is written before the old
    one is removed: a run killed in between leaves a duplicate that the next run's rewrite
    of the same shard, to the same bytes, removes); a shard left with nothing is removed."""
    out = Retired(set(), [], set(), 0, {})
    for shard in shards:
        keep = [want.get(k) == h for k, h in shard.rows]
        kept_rejects = [r for r in shard.rejects
                        if r["uid"] in want and want[r["uid"]] in (None, r.get(CONTENT_COLUMN))]
        stale = [kh for kh, ok in zip(shard.rows, keep) if not ok]
        stale += [(r["uid"], r.get(CONTENT_COLUMN, "")) for r in shard.rejects if r not in kept_rejects]
        out.live.update(k for (k, _), ok in zip(shard.rows, keep) if ok)
        out.rejects.extend(kept_rejects)
        if not stale:
            continue
        out.changed.update(k for k, _ in stale if k in want)
        out.retired += len(keep) - sum(keep)
        if not any(keep) and not kept_rejects:
            store.delete_shard(kind, shard.name)
            continue
        table = store.read_table(kind, shard.name).filter(pa.array(keep, pa.bool_()))
        pairs = [kh for kh, ok in zip(shard.rows, keep) if ok]
        pairs += [(r["uid"], r[CONTENT_COLUMN]) for r in kept_rejects]
        if kept_rejects:  # image shards: rows and rejects, in uid order as planned
            pairs.sort()
        name = shard_name([content_key(k, h) for k, h in pairs])
        data = FeatureStore.encode_shard(table, kept_rejects)
        store.put_shard(kind, name, data)
        if name != shard.name:
            store.delete_shard(kind, shard.name)
        out.reports[name] = ShardReport.of(kind, name, data, table.num_rows, kept_rejects)
    return out


def _latest_rejects(rejects: list[dict[str, str]], embedded: set[str]) -> dict[str, dict[str, str]]:
    """One reject per uid that is in no shard: a permanent reason over a transient one (a
    uid tried again that failed for good), then the first by (reason, detail)."""
    out: dict[str, dict[str, str]] = {}
    for r in sorted(rejects, key=lambda r: (r["uid"], r["reason"] in TRANSIENT_REASONS, r["reason"], r["detail"])):
        if r["uid"] not in embedded and r["uid"] not in out:
            out[r["uid"]] = r
    return out


def _rejects_table(rejects: Mapping[str, Mapping[str, str]]) -> pa.Table:
    # by uid, not in the engine's order: the same inputs, the same bytes
    return pa.Table.from_pylist([{f: rejects[u].get(f) for f in REJECTS_SCHEMA.names} for u in sorted(rejects)],
                                schema=REJECTS_SCHEMA)


def _caption_rows(manifest: pa.Table, embedded: set[str]) -> pa.Table:
    """Every caption of the ``embedded`` uids, with its content hash, by (uid, index)."""
    uids, cids, idxs, texts = [], [], [], []
    for uid, caps in zip(manifest.column("uid").to_pylist(), manifest.column("captions").to_pylist()):
        if uid not in embedded:
            continue
        for i, cap in enumerate(caps):
            uids.append(uid)
            cids.append(make_caption_id(uid, i))
            idxs.append(i)
            texts.append(cap)
    table = pa.table({"caption_id": pa.array(cids, pa.string()), "uid": pa.array(uids, pa.string()),
                      "caption_index": pa.array(idxs, pa.int32()), "caption": pa.array(texts, pa.string()),
                      CONTENT_COLUMN: pa.array([caption_sha256(t) for t in texts], pa.string())})
    return table.sort_by([("uid", "ascending"), ("caption_index", "ascending")])
