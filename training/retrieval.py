"""Retrieval and zero-shot metrics over joint embeddings: the one definition that mm-eval's report and mm-train's
validation use.

Retrieval: each query embedding is scored against every gallery embedding (dot product: the cosine similarity of the
unit vectors that `training.embeddings.embed_items` gives) and ranked. Which gallery items are right answers comes
from keys: gallery item j is a *positive* of query i when, for some key k, `query_keys[k][i] == gallery_keys[k][j]`
and that key is >= 0 (-1 means "no key" and never matches). `positive_keys` builds the keys of a data set's rows:
the same row, the same caption text, the same image or audio file, and optionally the same attribute tuple (e.g.
colour + shape + pitch), so a query may have many positives. A query without any positive in the gallery is left
out of the metrics and counted.

Definitions (also stated in mm-eval's report):

- rank of a gallery item = 1 + the number of gallery items with a strictly higher score (ties share the better
  rank); a query's *first-positive rank* is the rank of its best-scoring positive;
- R@K = share of queries whose first-positive rank is <= K; median and mean rank are of the first-positive rank;
- AP = average precision over all the query's positives, with scikit-learn's tie rule
  (`sklearn.metrics.average_precision_score` on the query's scores: a group of tied scores enters the
  precision-recall curve at once); mAP is its mean over the queries.

Memory stays bounded: the scores are computed for a chunk of queries at a time (at most `MAX_CHUNK_SCORES` floats,
128 MiB, by default), never as a queries x gallery matrix, so a 100,000 x 100,000 evaluation fits in a few hundred
MiB. Ranks are exact for the float32 scores.

```python
>>> import numpy as np, torch
>>> from training.retrieval import retrieval_metrics
>>> embeds = torch.nn.functional.normalize(torch.randn(100, 16), dim=-1)
>>> rows = np.arange(100)
>>> retrieval_metrics(embeds, embeds, [rows], [rows])["r@1"]  # each row retrieves itself
1.0

```
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from sklearn import metrics as skm
from tqdm.auto import tqdm

from training.metrics import bootstrap_intervals, finite_or_none, headline_statistics, quiet_warnings

# the problem_type of a joint embedding model's mm-eval report
CONTRASTIVE = "contrastive"
# at most this many float32 scores per chunk of queries (128 MiB); a chunk also holds a bool mask of the same shape
MAX_CHUNK_SCORES = 2 ** 25
# sorting a row of scores costs about as much as this many comparison passes over it (numpy 2 on x86, 2,000 to
# 100,000 items): a query with many distinct positive scores is counted by sorting its row, the others by passes
_SORT_COST = 32
# bootstrap index arrays are built this many entries at a time (resamples x queries), to bound their memory
_BOOTSTRAP_ENTRIES = 2 ** 22


# ---- per-query ranks -------------------------------------------------------------------------------------------------

@dataclass
class QueryRanks:
    """What `retrieval_ranks` gives, per query that has at least one positive in the gallery (in query order)."""

    query_index: np.ndarray  # (queries,) int64: index into query_embeds
    first_positive_rank: np.ndarray  # (queries,) int64: 1-based rank of the best-scoring positive
    average_precision: np.ndarray  # (queries,) float64: AP over all the query's positives
    positives: np.ndarray  # (queries,) int64: number of positives in the gallery
    queries_without_positive: int  # queries left out: no gallery item shares a key with them
    gallery_size: int


def _embedding_matrix(embeds: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    """`embeds` as a C-contiguous float32 numpy matrix on the CPU; refuses another rank and non-finite values."""
    if isinstance(embeds, torch.Tensor):
        embeds = embeds.detach().to("cpu", torch.float32).numpy()
    matrix = np.ascontiguousarray(embeds, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"{name}: expected a matrix (items, dim); got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name}: row {int(np.flatnonzero(~np.isfinite(matrix).all(1))[0])} is not finite")
    return matrix


def _key_arrays(keys: Sequence[np.ndarray], items: int, name: str) -> list[np.ndarray]:
    """`keys` as int64 arrays of length `items`; refuses no key, another length and non-integer keys."""
    if len(keys) == 0:
        raise ValueError(f"{name}: at least one key array is needed (e.g. the row index)")
    arrays = []
    for k, values in enumerate(keys):
        values = np.asarray(values)
        if values.shape != (items,):
            raise ValueError(f"{name}[{k}]: expected shape ({items},), one key per item; got {values.shape}")
        if values.size and values.dtype.kind not in "iub":
            raise ValueError(f"{name}[{k}]: keys must be integers (-1 = none); got dtype {values.dtype}")
        arrays.append(values.astype(np.int64))
    return arrays


def _chunk_queries(chunk_size: int | None, gallery_size: int) -> int:
    if chunk_size is None:
        return max(1, MAX_CHUNK_SCORES // max(gallery_size, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1 query; got {chunk_size}")
    return int(chunk_size)


class _PositiveIndex:
    """The gallery's keys sorted once, so a chunk of queries finds its positives without comparing every pair."""

    def __init__(self, gallery_keys: Sequence[np.ndarray], gallery_size: int):
        self.gallery_size = gallery_size
        self.order, self.sorted_keys = [], []
        for keys in gallery_keys:
            valid = np.flatnonzero(keys >= 0)
            order = valid[np.argsort(keys[valid], kind="stable")]
            self.order.append(order)
            self.sorted_keys.append(keys[order])

    def pairs(self, query_keys: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(query, gallery item) index pairs of every positive of these queries, each pair once, sorted by query
        then gallery item."""
        codes = []
        for order, sorted_keys, keys in zip(self.order, self.sorted_keys, query_keys):
            low = np.searchsorted(sorted_keys, keys, side="left")
            lengths = np.where(keys >= 0, np.searchsorted(sorted_keys, keys, side="right") - low, 0)
            queries = np.repeat(np.arange(len(keys)), lengths)
            # position of each pair in `order`: its query's first match plus its offset among that query's matches
            offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            codes.append(queries * self.gallery_size + order[np.repeat(low, lengths) + offsets])
        codes = np.unique(np.concatenate(codes))  # a pair matched by several keys counts once
        return codes // self.gallery_size, codes % self.gallery_size


def retrieval_ranks(query_embeds: torch.Tensor | np.ndarray, gallery_embeds: torch.Tensor | np.ndarray,
                    query_keys: Sequence[np.ndarray], gallery_keys: Sequence[np.ndarray],
                    chunk_size: int | None = None, progress: bool = False) -> QueryRanks:
    """Per query with a positive: its first-positive rank and its average precision (see the module docstring for
    the definitions and the tie rules), the lower level of `retrieval_metrics` and `retrieval_report`.

    Scores are float32 dot products of `query_embeds` (queries, dim) and `gallery_embeds` (gallery, dim) (pass unit
    vectors for cosine similarity), computed `chunk_size` queries at a time on the CPU with one matrix product per
    chunk (numpy's BLAS gives each score the same bits whatever the chunk's size, so the results do not depend on
    `chunk_size`). Memory is about `5 * chunk_size * gallery` bytes (the scores and a mask); the default chunk holds
    at most `MAX_CHUNK_SCORES` (2**25) scores, 128 MiB of float32, whatever the sizes. Every positive's rank is
    counted within its chunk, by one comparison pass over the chunk per distinct positive score, or, for queries with
    many distinct positive scores, by sorting that query's row (whichever costs less); no queries x gallery matrix
    is ever built.

    `query_keys` and `gallery_keys` are equally many int arrays, one key per item (see `positive_keys`). Raises
    `ValueError` naming the argument for embeddings of different widths, non-finite embeddings, an empty gallery,
    keys of the wrong length or type, or `chunk_size` < 1.
    """
    queries = _embedding_matrix(query_embeds, "query_embeds")
    gallery = _embedding_matrix(gallery_embeds, "gallery_embeds")
    if len(gallery) == 0:
        raise ValueError("gallery_embeds: the gallery is empty")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"gallery_embeds: dimension {gallery.shape[1]} differs from query_embeds' "
                         f"{queries.shape[1]}")
    query_keys = _key_arrays(query_keys, len(queries), "query_keys")
    gallery_keys = _key_arrays(gallery_keys, len(gallery), "gallery_keys")
    if len(query_keys) != len(gallery_keys):
        raise ValueError(f"gallery_keys: {len(gallery_keys)} key arrays, but query_keys has {len(query_keys)}; "
                         "key k of a query is compared with key k of each gallery item")
    size = len(gallery)
    chunk = _chunk_queries(chunk_size, size)
    index = _PositiveIndex(gallery_keys, size)
    gallery_columns = np.ascontiguousarray(gallery.T)  # (dim, gallery): one matmul per chunk writes its scores
    # reused by every chunk: the memory stays put, and fresh pages are not faulted in per chunk
    scores_buffer = np.empty((max(2, min(chunk, len(queries))), size), dtype=np.float32)
    mask_buffer = np.empty(scores_buffer.shape, dtype=bool)
    parts = []
    for start in tqdm(range(0, len(queries), chunk), desc="retrieval", leave=False, disable=not progress):
        stop = min(start + chunk, len(queries))
        block = queries[start:stop]
        if len(block) == 1:
            # BLAS computes a single row as a matrix-vector product, which sums in another order than the matrix
            # product of any larger chunk: a duplicated row keeps every score equal whatever the chunk size
            block = np.repeat(block, 2, axis=0)
        np.matmul(block, gallery_columns, out=scores_buffer[:len(block)])
        scores = scores_buffer[:stop - start]
        rows, items = index.pairs([keys[start:stop] for keys in query_keys])
        parts.append(_chunk_ranks(scores, mask_buffer[:stop - start], rows, items, start))
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return QueryRanks(empty, empty, np.zeros(0), empty, 0, size)
    query_index, first_rank, average_precision, positives = (np.concatenate(column) for column in zip(*parts))
    return QueryRanks(query_index, first_rank, average_precision, positives,
                      len(queries) - len(query_index), size)


def _row_counts(mask: np.ndarray) -> np.ndarray:
    """True entries per row of a bool matrix, as int64. (Summing its bytes into int32 is about twice as fast as
    np.count_nonzero along an axis; a row holds fewer than 2**31 entries.)"""
    return mask.view(np.uint8).sum(axis=1, dtype=np.int32).astype(np.int64)


def _comparison_passes(per_row: np.ndarray) -> int:
    """How many comparison passes over the whole chunk count its rows' positives most cheaply: the rows with at most
    that many distinct positive scores take one pass per score (the passes run over every row), the others are
    sorted one by one (`_SORT_COST` passes each)."""
    candidates = np.unique(np.append(per_row, 0))  # ascending, 0 = sort every row with a positive
    sorted_rows = len(per_row) - np.searchsorted(np.sort(per_row), candidates, side="right")
    return int(candidates[np.argmin(candidates * len(per_row) + _SORT_COST * sorted_rows)])


def _chunk_ranks(scores: np.ndarray, mask: np.ndarray, rows: np.ndarray, items: np.ndarray, start: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One chunk's (query index, first-positive rank, AP, positives) for its rows with a positive. `scores` (rows,
    gallery) float32; `mask` a bool buffer of its shape; (`rows`, `items`) the positive pairs, sorted by row."""
    count, size = scores.shape
    positive_scores = scores[rows, items]
    # each row's distinct positive scores, ascending, with how many positives have each
    order = np.lexsort((positive_scores, rows))
    rows, positive_scores = rows[order], positive_scores[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (positive_scores[1:] != positive_scores[:-1])
    starts = np.flatnonzero(first)
    score_rows, distinct = rows[starts], positive_scores[starts]  # one entry per (row, distinct score)
    multiplicity = np.diff(np.append(starts, len(rows)))
    per_row = np.bincount(score_rows, minlength=count)  # distinct positive scores per row
    positives = np.bincount(rows, minlength=count)
    row_start = np.cumsum(per_row) - per_row  # where each row's entries begin
    slot = np.arange(len(distinct)) - row_start[score_rows]  # 0 = the row's lowest positive score
    # positives scoring >= each distinct score: the row's positives minus those below it
    below = np.cumsum(multiplicity) - multiplicity
    positives_at_or_above = positives[score_rows] - (below - below[row_start[score_rows]])
    best = np.full(count, np.inf, dtype=np.float32)  # a row without positives is never counted: +inf
    has_positive = per_row > 0
    best[has_positive] = distinct[row_start[has_positive] + per_row[has_positive] - 1]

    at_or_above = np.empty(len(distinct), dtype=np.int64)  # gallery items scoring >= each distinct positive score
    higher = np.zeros(count, dtype=np.int64)  # gallery items scoring > the row's best positive
    width = _comparison_passes(per_row)
    few = per_row[score_rows] <= width
    if width:
        thresholds = np.full((count, width), np.inf, dtype=np.float32)
        thresholds[score_rows[few], slot[few]] = distinct[few]
        counts = np.empty((count, width), dtype=np.int64)
        for column in range(width):  # one pass over the chunk per column, into the reused mask
            np.greater_equal(scores, thresholds[:, column:column + 1], out=mask)
            counts[:, column] = _row_counts(mask)
        at_or_above[few] = counts[score_rows[few], slot[few]]
        np.greater(scores, best[:, None], out=mask)
        higher = _row_counts(mask)
    for row in np.flatnonzero(per_row > width):
        ordered = np.sort(scores[row])
        entries = slice(row_start[row], row_start[row] + per_row[row])
        at_or_above[entries] = size - np.searchsorted(ordered, distinct[entries], side="left")
        higher[row] = size - np.searchsorted(ordered, best[row], side="right")
    # AP = sum over positives of precision at its score / positives, the tied positives sharing one precision
    precision_sum = np.bincount(score_rows, weights=multiplicity * positives_at_or_above / at_or_above,
                                minlength=count)
    kept = np.flatnonzero(has_positive)
    return (kept + start, higher[kept] + 1, precision_sum[kept] / positives[kept], positives[kept].astype(np.int64))


# ---- metrics ---------------------------------------------------------------------------------------------------------

def _checked_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks: cut-offs must be >= 1; got {list(ks)}")
    return ks


def rank_statistics(ranks: QueryRanks, ks: Sequence[int] = (1, 5, 10)
                    ) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """{metric: statistic(indices)} over the evaluated queries, vectorised as `training.metrics.bootstrap_intervals`
    takes them (`indices` (..., queries) -> values of shape `indices.shape[:-1]`): "r@K" for each K in `ks`,
    "median_rank", "mean_rank", "map". With `indices = np.arange(queries)` they give the metrics themselves."""
    first, average_precision = ranks.first_positive_rank, ranks.average_precision
    statistics: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        f"r@{k}": (lambda i, k=k: (first[i] <= k).mean(-1)) for k in _checked_ks(ks)}
    statistics["median_rank"] = lambda i: np.median(first[i], axis=-1)
    statistics["mean_rank"] = lambda i: first[i].mean(-1)
    statistics["map"] = lambda i: average_precision[i].mean(-1)
    return statistics


def _metric_values(ranks: QueryRanks, ks: Sequence[int]) -> dict[str, float]:
    everything = np.arange(len(ranks.first_positive_rank))
    return {name: float(statistic(everything)) if len(everything) else math.nan
            for name, statistic in rank_statistics(ranks, ks).items()}


def retrieval_metrics(query_embeds: torch.Tensor | np.ndarray, gallery_embeds: torch.Tensor | np.ndarray,
                      query_keys: Sequence[np.ndarray], gallery_keys: Sequence[np.ndarray],
                      ks: Sequence[int] = (1, 5, 10), chunk_size: int | None = None,
                      progress: bool = False) -> dict[str, float]:
    """Retrieval metrics of `query_embeds` against `gallery_embeds` (see the module docstring): "r@K" for each K in
    `ks`, "median_rank", "mean_rank" (of the 1-based first-positive rank), "map", and the counts "queries" (those
    with a positive, which the metrics average over), "queries_without_positive" and "gallery_size". The metrics are
    NaN when no query has a positive. Memory and arguments as for `retrieval_ranks`; `ValueError` for a cut-off < 1.

    ```python
    >>> metrics = retrieval_metrics(text_embeds, image_embeds, [rows], [rows])  # doctest: +SKIP
    >>> metrics["r@1"], metrics["map"], metrics["queries"]  # doctest: +SKIP
    ```
    """
    ks = _checked_ks(ks)
    ranks = retrieval_ranks(query_embeds, gallery_embeds, query_keys, gallery_keys, chunk_size, progress)
    return {**_metric_values(ranks, ks), "queries": len(ranks.query_index),
            "queries_without_positive": ranks.queries_without_positive, "gallery_size": ranks.gallery_size}


def _bootstrap_batch(samples: int) -> int:
    return max(1, _BOOTSTRAP_ENTRIES // max(samples, 1))


def retrieval_report(query_embeds: torch.Tensor | np.ndarray, gallery_embeds: torch.Tensor | np.ndarray,
                     query_keys: Sequence[np.ndarray], gallery_keys: Sequence[np.ndarray],
                     ks: Sequence[int] = (1, 5, 10), chunk_size: int | None = None, bootstrap_rounds: int = 1000,
                     seed: int = 0, confidence_level: float = 0.95, progress: bool = False) -> dict[str, Any]:
    """`retrieval_metrics` with a percentile bootstrap confidence interval of each metric (queries resampled with
    replacement, `training.metrics.bootstrap_intervals`): {"metrics": {metric: value}, "ci": {metric: [low, high] or
    None}, "ci_method", "queries", "queries_without_positive", "gallery_size"}. The gallery stays fixed: the
    interval describes the spread over queries. Metrics are None (JSON null) and intervals None when no query has a
    positive; intervals are None with fewer than 2 queries or `bootstrap_rounds` 0."""
    ks = _checked_ks(ks)
    ranks = retrieval_ranks(query_embeds, gallery_embeds, query_keys, gallery_keys, chunk_size, progress)
    samples = len(ranks.query_index)
    with quiet_warnings():
        intervals = bootstrap_intervals(rank_statistics(ranks, ks), samples, bootstrap_rounds, seed,
                                        confidence_level, batch=_bootstrap_batch(samples))
    return {
        "metrics": {name: finite_or_none(value) for name, value in _metric_values(ranks, ks).items()},
        "ci": intervals,
        "ci_method": f"{confidence_level:.0%} percentile bootstrap over the queries (scipy.stats.bootstrap), "
                     f"{bootstrap_rounds} rounds, seed {seed}",
        "queries": samples,
        "queries_without_positive": ranks.queries_without_positive,
        "gallery_size": ranks.gallery_size,
    }


# ---- which rows are positives of each other --------------------------------------------------------------------------

def _hashable(value: Any) -> Any:
    """A cell as a dict key: lists (JSON/Parquet cells) as tuples, dicts as sorted item tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    return value


def _ids(values: Sequence[Any]) -> np.ndarray:
    """An int64 id per value, equal for equal values (in order of first appearance); -1 for None."""
    seen: dict[Any, int] = {}
    ids = np.full(len(values), -1, dtype=np.int64)
    for i, value in enumerate(values):
        if value is not None:
            ids[i] = seen.setdefault(_hashable(value), len(seen))
    return ids


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and not value.strip())


def positive_keys(dataset: datasets.Dataset, columns: Mapping[str, str],
                  positive_columns: Sequence[str] | None = None) -> list[np.ndarray]:
    """The keys of `dataset`'s rows for `retrieval_ranks` (the same for queries and gallery, which are the same rows
    seen through two modalities; index them with the rows each side has): [the row index; for each modality column
    of `columns` ({"image"/"text"/"audio": column}), an id of the cell's content, equal for the identical caption
    text or the same image/audio path (or bytes), -1 for an empty cell; and with `positive_columns`, an id of the
    row's tuple of those columns' values, -1 where any of them is empty]. So a caption retrieves its own row's image,
    any row's image with the same file or the same caption, and, with `positive_columns`, any image of the same
    attributes.

    Raises `ValueError` naming `columns` for an unknown modality or a column the data set lacks, and naming
    `positive_columns` for a column it lacks."""
    from training.data import _media, _text
    from training.embeddings import model_modality

    keys = [np.arange(len(dataset), dtype=np.int64)]
    for modality, column in columns.items():
        try:
            read = _text if model_modality(modality) == "text" else _media
        except ValueError as error:
            raise ValueError(f"columns: {error}") from None
        if column not in dataset.column_names:
            raise ValueError(f"columns: {column!r} ({modality}) is not a column of the data set (columns: "
                             f"{dataset.column_names})")
        keys.append(_ids([read(value) for value in dataset[column]]))
    if positive_columns:
        missing = [column for column in positive_columns if column not in dataset.column_names]
        if missing:
            raise ValueError(f"positive_columns: {missing[0]!r} is not a column of the data set (columns: "
                             f"{dataset.column_names})")
        values = [dataset[column] for column in positive_columns]
        keys.append(_ids([None if any(_is_empty(v) for v in row) else row for row in zip(*values)]))
    return keys


# ---- zero-shot classification ----------------------------------------------------------------------------------------

def zero_shot_accuracy(item_embeds: torch.Tensor | np.ndarray, class_embeds: torch.Tensor | np.ndarray,
                       labels: np.ndarray, *, class_names: Sequence[str] | None = None, bootstrap_rounds: int = 1000,
                       seed: int = 0, confidence_level: float = 0.95) -> dict[str, Any]:
    """Zero-shot classification of items by their nearest class embedding (the highest dot product, i.e. cosine
    similarity of unit vectors; ties go to the lowest class index, as `argmax`): accuracy and macro-F1
    (scikit-learn; macro over the classes in the labels or predictions, F1 0 for a class never predicted), each with
    a percentile bootstrap interval over the items; per-class precision/recall/F1/support; the confusion matrix
    (rows true, columns predicted); and chance levels: "uniform" (1 / classes) and "majority" (the most frequent
    class's share of the items).

    `item_embeds` (items, dim); `class_embeds` (classes, dim), e.g. `embed_items` of the prompts
    `prompt_template.format(name)`; `labels` (items,) class indices. Raises `ValueError` naming the argument for no
    items, mismatched shapes, or a label outside [0, classes)."""
    items = _embedding_matrix(item_embeds, "item_embeds")
    classes = _embedding_matrix(class_embeds, "class_embeds")
    labels = np.asarray(labels)
    if len(items) == 0:
        raise ValueError("item_embeds: no items to classify")
    if len(classes) == 0:
        raise ValueError("class_embeds: no classes")
    if classes.shape[1] != items.shape[1]:
        raise ValueError(f"class_embeds: dimension {classes.shape[1]} differs from item_embeds' {items.shape[1]}")
    if labels.shape != (len(items),) or (labels.size and labels.dtype.kind not in "iu"):
        raise ValueError(f"labels: expected ({len(items)},) integer class indices; got shape {labels.shape}, "
                         f"dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= len(classes):
        raise ValueError(f"labels: class indices must lie in [0, {len(classes)}); got {labels.min()}..{labels.max()}")
    names = [str(name) for name in class_names] if class_names is not None else [str(i) for i in range(len(classes))]
    if len(names) != len(classes):
        raise ValueError(f"class_names: {len(names)} names for {len(classes)} class embeddings")
    scores = (items @ classes.T).astype(np.float64)  # (items, classes)
    predicted = scores.argmax(1)
    every_class = list(range(len(classes)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, predicted, labels=every_class,
                                                                         average=None, zero_division=0)
    samples, statistics = headline_statistics(labels, scores, names, "single_label_classification")
    with quiet_warnings():
        intervals = bootstrap_intervals({key: statistics[key] for key in ("accuracy", "macro_f1")}, samples,
                                        bootstrap_rounds, seed, confidence_level, batch=_bootstrap_batch(samples))
    return {
        "samples": int(len(labels)),
        "classes": names,
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "macro_f1": float(skm.f1_score(labels, predicted, average="macro", zero_division=0)),
        "ci": intervals,
        "ci_method": f"{confidence_level:.0%} percentile bootstrap over the items (scipy.stats.bootstrap), "
                     f"{bootstrap_rounds} rounds, seed {seed}",
        "chance": {"uniform": 1.0 / len(classes),
                   "majority": float(np.bincount(labels, minlength=len(classes)).max() / len(labels))},
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(names)},
        "confusion_matrix": skm.confusion_matrix(labels, predicted, labels=every_class).tolist(),
    }
