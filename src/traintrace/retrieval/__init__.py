"""Layer 6 — retrieval: top-k proponents and opponents over score blocks."""

from traintrace.retrieval.topk import Ranking, TopK, top_k_from_blocks

__all__ = ["Ranking", "TopK", "top_k_from_blocks"]
