"""Data curation: balance the image-text pairs on the image side and the text side, and
drop near-duplicates (the curate stage; RECIPES.md "Curation").

- :mod:`.config`: the ``curate`` params section, :class:`CurateConfig` (import-light);
- :mod:`.curation`: ``curate(uids, embeddings, captions, cfg)``, its steps and stats;
- :mod:`.kmeans`, :mod:`.dedup`, :mod:`.sampling`, :mod:`.text_balance`: the steps;
- :mod:`.tables`: what the curate stage reads (train pairs, features) and writes (uid
  list, stats, plot tables); the stage is :mod:`dinoalign.stages.curate`.

The names below other than the config are imported on first use, so that loading params
(which imports :class:`CurateConfig`) stays free of numpy, pyarrow and FAISS.
"""

from __future__ import annotations

from dinoalign._lazy import lazy_exports
from dinoalign.curate.config import COMBINE_MODES, CurateConfig

__all__ = [
    "COMBINE_MODES",
    "ClusterHierarchy",
    "CurateConfig",
    "CurationResult",
    "Deduplication",
    "TextBalance",
    "balance_text",
    "balanced_sample",
    "cluster_column",
    "curate",
    "deduplicate",
    "hierarchical_kmeans",
    "load_vocab",
    "water_fill",
]

# name -> the submodule that defines it, imported on first access (PEP 562)
_LAZY = {
    "CurationResult": "curation",
    "cluster_column": "curation",
    "curate": "curation",
    "ClusterHierarchy": "kmeans",
    "hierarchical_kmeans": "kmeans",
    "Deduplication": "dedup",
    "deduplicate": "dedup",
    "balanced_sample": "sampling",
    "water_fill": "sampling",
    "TextBalance": "text_balance",
    "balance_text": "text_balance",
    "load_vocab": "text_balance",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
