"""Layer 6 — retrieval: top-k proponents and opponents over score blocks, stores and indexes.

* :func:`exact_top_k` — exact streaming top-k over a :class:`~traintrace.features.store.FeatureStore`
  (or in-memory features) for the weighted sum over checkpoints, memory flat in ``n``;
* :class:`FaissIndex` — a FAISS inner-product index over ``sqrt(w_c) F_c`` concatenated across
  checkpoints, so one inner product is the whole TracIn sum (exact flat, IVF or HNSW);
* :func:`top_k` — exact by default; a FAISS index only with ``method="faiss"`` (then it states
  the index size and expected recall, and ``verify_recall=`` measures recall against exact).
"""

from traintrace.retrieval.exact import exact_top_k
from traintrace.retrieval.faiss_index import (
    ApproximateSearchWarning,
    ApproximateTopK,
    FaissIndex,
    top_k,
)
from traintrace.retrieval.topk import Ranking, TopK, top_k_from_blocks

__all__ = [
    "ApproximateSearchWarning",
    "ApproximateTopK",
    "FaissIndex",
    "Ranking",
    "TopK",
    "exact_top_k",
    "top_k",
    "top_k_from_blocks",
]
