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


@SOURCES.register("synthetic")
def synthetic_source(cfg: world.SyntheticWorldConfig, workdir: Path) -> Iterator[PairRecord]:
    """Write the world under ``workdir/<cfg.source>`` and yield one record per image;
    ``world.json`` (vocabulary, held-out compositions and uids) is written last."""
    out_dir = Path(workdir) / cfg.source
    jobs = [(split, i) for split in world.SPLITS for i in range(cfg.count(split))]
    workers = max(1, min(os.cpu_count() or 1, 8))
    with cf.ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(world.write_sample, cfg, out_dir, s, i) for s, i in jobs]
        for fut in futures:
            yield fut.result()
    (out_dir / "world.json").write_text(json.dumps(world.world_description(cfg), indent=1))
