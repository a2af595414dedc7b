"""The ``synthetic`` source: the demo world (:mod:`dinoalign.data.synthetic`), rendered in
parallel worker processes (each sample depends only on (config, split, index))."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
from collections.abc import Iterator
from pathlib import Path

from dinoalign.data import synthetic as world
from dinoalign.data.schema import PairRecord
from dinoalign.data.sources import SOURCES
from dinoalign.storage import write_atomic


@SOURCES.register("synthetic")
def synthetic_source(cfg: world.SyntheticWorldConfig, workdir: Path) -> Iterator[PairRecord]:
    """Write the world under ``workdir/<cfg.source>`` (``images/<split>/<index>.png``,
    ``masks/<split>/<index>.png``) and yield one record per image (train, val, test in
    index order); ``world.json`` (vocabulary, held-out compositions and uids) is written
    last, once every image exists.

    Idempotent: images already written by the same config are kept, so a re-run, or a
    run with a larger split, renders only what is missing."""
    out_dir = Path(workdir) / cfg.source
    jobs = [(split, i) for split in world.SPLITS for i in range(cfg.count(split))]
    workers = max(1, min(os.cpu_count() or 1, 8))
    with cf.ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(world.write_sample, cfg, out_dir, s, i) for s, i in jobs]
        for fut in futures:
            yield fut.result()
    write_atomic(out_dir / "world.json", json.dumps(world.world_description(cfg), indent=1))
