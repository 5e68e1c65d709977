"""Fusing a dense (embedding) ranking with a keyword (BM25) ranking into one.

Two rules, as the vector databases users know offer them (Milvus' RRFRanker and
WeightedRanker, Elasticsearch/OpenSearch RRF, Qdrant fusion):

* ``rrf``: reciprocal-rank fusion, score = sum over the rankings of 1 / (RRF_K + rank), rank
  counted from 1. Needs no calibration between the two scores; a document missing from one
  ranking gets nothing from it.
* ``weighted``: weight x cosine + (1 - weight) x BM25 / (the best BM25 score of the query's
  candidates), so both parts are in [0, 1] for the best match. The cosine of every candidate
  is exact (keyword-only candidates get theirs computed); a dense-only candidate's keyword
  part is 0 (it has none of the query's words, or fewer than the keyword list's last).

Which is the default, and the weight, come from bench/search_quality.py (below).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DEFAULT_FUSION", "DEFAULT_WEIGHT", "FUSIONS", "RRF_K", "Fused", "fuse"]

FUSIONS = ("rrf", "weighted")
RRF_K = 60  # the constant of Cormack et al. (2009), also Milvus' and Elasticsearch's default
# The default fusion and the dense part's weight, measured (bench/search_quality.py, TREC QA
# open-corpus retrieval through the daemon, docs/benchmarks.md): weighted 0.7 is the one
# setting at or above both dense and keyword on MRR@10 and recall@10 on both sets (MRR 1.06x
# and 1.04x dense); RRF gains on one set (1.06x) but falls just under dense on the other.
DEFAULT_FUSION = "weighted"
DEFAULT_WEIGHT = 0.7


@dataclass(frozen=True)
class Fused:
    label: int
    score: float
    dense: float | None  # cosine, when known
    keyword: float | None  # BM25 (higher is better), when the document matched a query word


def fuse(
    dense: list[tuple[int, float]],
    keyword: list[tuple[int, float]],
    k: int,
    *,
    method: str = DEFAULT_FUSION,
    weight: float = DEFAULT_WEIGHT,
    cosines: Mapping[int, float] | None = None,
) -> list[Fused]:
    """The k best of the union of the two rankings (each best first), best first; ties keep
    the dense ranking's order. ``cosines``: exact cosines of keyword-only candidates."""
    if method not in FUSIONS:
        raise ValueError(f"unknown fusion {method!r}")
    dense_scores = dict(dense)
    keyword_scores = dict(keyword)
    extra = cosines or {}
    order: dict[int, int] = {}
    for label, _ in [*dense, *keyword]:
        order.setdefault(label, len(order))
    fused: list[Fused] = []
    if method == "rrf":
        dense_rank = {label: rank for rank, (label, _) in enumerate(dense, 1)}
        keyword_rank = {label: rank for rank, (label, _) in enumerate(keyword, 1)}
        for label in order:
            score = 0.0
            if label in dense_rank:
                score += 1.0 / (RRF_K + dense_rank[label])
            if label in keyword_rank:
                score += 1.0 / (RRF_K + keyword_rank[label])
            fused.append(
                Fused(
                    label,
                    score,
                    dense_scores.get(label, extra.get(label)),
                    keyword_scores.get(label),
                )
            )
    else:
        best = max((score for _, score in keyword), default=0.0)
        for label in order:
            cosine = dense_scores.get(label, extra.get(label))
            bm25 = keyword_scores.get(label)
            part = (bm25 / best) if bm25 is not None and best > 0 else 0.0
            score = weight * (cosine if cosine is not None else 0.0) + (1.0 - weight) * part
            fused.append(Fused(label, score, cosine, bm25))
    fused.sort(key=lambda item: (-item.score, order[item.label]))
    return fused[:k]
