"""training.retrieval (#16, joint embedding): retrieval metrics equal a brute-force reference over the full
similarity matrix (scikit-learn's average precision per query), with several positives per query and tied scores;
chunking changes nothing; a 100,000 x 100,000 evaluation runs in bounded memory; positive keys of a data set's rows;
zero-shot accuracy and macro-F1 against a hand computation."""

from __future__ import annotations

import threading
import time
import tracemalloc

import datasets
import numpy as np
import psutil
import pytest
import torch
from sklearn import metrics as skm

from training import retrieval
from training.retrieval import (positive_keys, rank_statistics, retrieval_metrics, retrieval_ranks, retrieval_report,
                                zero_shot_accuracy)


# ---- a brute-force reference over the full similarity matrix ---------------------------------------------------------

def reference_ranks(queries, gallery, query_keys, gallery_keys):
    """(evaluated query indices, first-positive ranks, APs) from the full matrix: rank = 1 + the number of strictly
    higher scores; AP = sklearn.metrics.average_precision_score of the query's positives."""
    scores = torch.from_numpy(queries) @ torch.from_numpy(gallery).T  # float32, like the code under test
    scores = scores.numpy()
    kept, ranks, aps = [], [], []
    for i in range(len(queries)):
        positive = np.zeros(len(gallery), dtype=bool)
        for q, g in zip(query_keys, gallery_keys):
            positive |= (q[i] >= 0) & (g == q[i])
        if not positive.any():
            continue
        kept.append(i)
        ranks.append(1 + int((scores[i] > scores[i][positive].max()).sum()))
        aps.append(skm.average_precision_score(positive, scores[i]))
    return np.array(kept), np.array(ranks), np.array(aps)


def integer_case(rng):
    """Small-integer embeddings: every score is an exact integer, so ties are everywhere; three keys (row, a
    caption-like id shared by a few rows, an attribute-like id shared by many), -1 cells among them."""
    queries = rng.integers(-2, 3, (70, 6)).astype(np.float32)
    gallery = rng.integers(-2, 3, (90, 6)).astype(np.float32)
    rows_q, rows_g = rng.integers(0, 90, 70), np.arange(90)
    rows_q[:5] = -1  # these queries can only match through the other keys
    caption_q, caption_g = rng.integers(-1, 30, 70), rng.integers(-1, 30, 90)
    attribute_q, attribute_g = rng.integers(-1, 4, 70), rng.integers(-1, 4, 90)
    return queries, gallery, [rows_q, caption_q, attribute_q], [rows_g, caption_g, attribute_g]


def float_case(rng):
    """Random unit vectors and an attribute key with 3 values: ~30 positives per query, each with its own score,
    and 20 queries with one positive."""
    queries = rng.standard_normal((50, 8)).astype(np.float32)
    gallery = rng.standard_normal((100, 8)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    attribute_q = rng.integers(0, 3, 50)
    attribute_q[:20] = -1  # ... and these 20 have one positive (their row), on the comparison path
    return queries, gallery, [np.arange(50), attribute_q], [np.arange(100), rng.integers(0, 3, 100)]


def duplicate_case(rng):
    """Duplicated gallery items: a positive tied with negatives of the exact same score."""
    base = rng.standard_normal((20, 4)).astype(np.float32)
    gallery = np.concatenate([base, base])  # item j and j + 20 score the same against every query
    keys_g = np.concatenate([np.arange(20), np.full(20, -1)])
    return base.copy(), gallery, [np.arange(20)], [keys_g]


CASES = {"integer scores (ties)": integer_case, "float scores (many positives)": float_case,
         "duplicate gallery items": duplicate_case}
# how a chunk counts its positives' ranks: its own choice, by sorting every row, or by comparison passes only
COUNTING = {"chosen per chunk": None, "sorting rows": 0, "comparison passes": 10 ** 9}


@pytest.mark.parametrize("counting", COUNTING)
@pytest.mark.parametrize("case", CASES)
def test_ranks_and_average_precision_equal_the_brute_force_reference(case, counting, rng, monkeypatch):
    if COUNTING[counting] is not None:
        monkeypatch.setattr(retrieval, "_SORT_COST", COUNTING[counting])
    queries, gallery, query_keys, gallery_keys = CASES[case](rng)
    kept, ranks, aps = reference_ranks(queries, gallery, query_keys, gallery_keys)
    result = retrieval_ranks(queries, gallery, query_keys, gallery_keys)

    np.testing.assert_array_equal(result.query_index, kept)
    np.testing.assert_array_equal(result.first_positive_rank, ranks)
    np.testing.assert_allclose(result.average_precision, aps, rtol=0, atol=1e-9)
    metrics = retrieval_metrics(torch.from_numpy(queries), torch.from_numpy(gallery), query_keys, gallery_keys)
    for k in (1, 5, 10):
        assert metrics[f"r@{k}"] == pytest.approx(np.mean(ranks <= k), abs=1e-12)
    assert metrics["median_rank"] == np.median(ranks)
    assert metrics["mean_rank"] == pytest.approx(ranks.mean(), abs=1e-9)
    assert metrics["map"] == pytest.approx(aps.mean(), abs=1e-9)
    assert metrics["queries"] + metrics["queries_without_positive"] == len(queries)
    assert metrics["gallery_size"] == len(gallery)


def test_the_reference_cases_hold_ties_and_many_positives(rng):
    """The cases above are only a proof if they hold what they claim: tied scores, and queries with one and with
    many positives."""
    queries, gallery, query_keys, gallery_keys = integer_case(rng)
    scores = queries @ gallery.T
    assert all(len(np.unique(row)) < len(row) / 3 for row in scores)
    queries, gallery, query_keys, gallery_keys = float_case(rng)
    positives = retrieval_ranks(queries, gallery, query_keys, gallery_keys).positives
    assert positives.max() > 20 and positives.min() == 1


@pytest.mark.parametrize("distinct_scores, passes", [
    ([1] * 300, 1),  # one positive each: one pass, and no row sorted
    ([0] * 100 + [2] * 200, 2),
    ([4000] * 300, 0),  # thousands of positives each: every row sorted
    ([1] * 299 + [60], 1),  # one row with many: that row sorted, the others compared
])
def test_a_chunk_counts_by_passes_or_by_sorting_whichever_is_cheaper(distinct_scores, passes):
    assert retrieval._comparison_passes(np.array(distinct_scores)) == passes


@pytest.mark.parametrize("counting", COUNTING)
@pytest.mark.parametrize("case", CASES)
def test_chunked_equals_unchunked_exactly(case, counting, rng, monkeypatch):
    if COUNTING[counting] is not None:
        monkeypatch.setattr(retrieval, "_SORT_COST", COUNTING[counting])
    queries, gallery, query_keys, gallery_keys = CASES[case](rng)
    whole = retrieval_ranks(queries, gallery, query_keys, gallery_keys, chunk_size=len(queries))
    for chunk_size in (1, 3, 16, None):
        part = retrieval_ranks(queries, gallery, query_keys, gallery_keys, chunk_size=chunk_size)
        np.testing.assert_array_equal(part.query_index, whole.query_index)
        np.testing.assert_array_equal(part.first_positive_rank, whole.first_positive_rank)
        np.testing.assert_array_equal(part.average_precision, whole.average_precision)


def test_recall_at_k_is_monotone_in_k(rng):
    queries, gallery, query_keys, gallery_keys = float_case(rng)
    ks = tuple(range(1, 31))
    metrics = retrieval_metrics(queries, gallery, query_keys, gallery_keys, ks=ks)
    recalls = [metrics[f"r@{k}"] for k in ks]
    assert recalls == sorted(recalls) and 0 <= recalls[0] and recalls[-1] <= 1


def test_a_query_without_positive_is_left_out_and_counted():
    gallery = np.eye(3, dtype=np.float32)
    queries = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    # query 3 has no key that any gallery item has; query 2 has only -1 keys
    query_keys, gallery_keys = [np.array([0, 1, -1, 7])], [np.array([0, 1, 2])]
    metrics = retrieval_metrics(queries, gallery, query_keys, gallery_keys)
    assert metrics["queries"] == 2 and metrics["queries_without_positive"] == 2
    assert metrics["r@1"] == 1.0 and metrics["map"] == 1.0
    none = retrieval_metrics(queries, gallery, [np.full(4, -1)], gallery_keys)
    assert none["queries"] == 0 and none["queries_without_positive"] == 4 and np.isnan(none["r@1"])
    report = retrieval_report(queries, gallery, [np.full(4, -1)], gallery_keys)
    assert report["metrics"]["map"] is None and report["ci"]["map"] is None


def test_retrieval_report_intervals_hold_the_point_estimate(rng):
    queries, gallery, query_keys, gallery_keys = float_case(rng)
    report = retrieval_report(queries, gallery, query_keys, gallery_keys, bootstrap_rounds=200, seed=3)
    assert set(report["metrics"]) == {"r@1", "r@5", "r@10", "median_rank", "mean_rank", "map"} == set(report["ci"])
    for name, value in report["metrics"].items():
        low, high = report["ci"][name]
        assert low <= value <= high, name
    assert report["queries"] == 50 and report["gallery_size"] == 100
    again = retrieval_report(queries, gallery, query_keys, gallery_keys, bootstrap_rounds=200, seed=3)
    assert again == report  # the seed fixes the intervals


def test_rank_statistics_are_vectorised_over_resamples(rng):
    queries, gallery, query_keys, gallery_keys = float_case(rng)
    ranks = retrieval_ranks(queries, gallery, query_keys, gallery_keys)
    indices = rng.integers(0, len(ranks.query_index), (7, len(ranks.query_index)))
    for name, statistic in rank_statistics(ranks).items():
        batched = statistic(indices)
        assert batched.shape == (7,)
        assert batched[2] == pytest.approx(statistic(indices[2])), name


def test_100k_queries_by_100k_gallery_runs_in_bounded_memory():
    """10**10 scores, never held at once: the peak of numpy's allocations (tracemalloc) stays under 512 MiB and the
    process's resident memory grows by less than 1 GiB. The time is printed, not asserted."""
    n, dim = 100_000, 8
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((n, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    gallery = queries + 0.3 * rng.standard_normal((n, dim), dtype=np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    rows = np.arange(n)
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak_rss = [baseline]
    done = threading.Event()

    def sample_rss():
        while not done.is_set():
            peak_rss[0] = max(peak_rss[0], process.memory_info().rss)
            time.sleep(0.005)

    watcher = threading.Thread(target=sample_rss)
    watcher.start()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        metrics = retrieval_metrics(queries, gallery, [rows], [rows])
    finally:
        seconds = time.perf_counter() - start
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        done.set()
        watcher.join()
    growth = peak_rss[0] - baseline
    print(f"\n100,000 x 100,000 (dim {dim}): {seconds:.1f} s, traced peak {traced_peak / 2**20:.0f} MiB, "
          f"RSS growth {growth / 2**20:.0f} MiB; r@1 {metrics['r@1']:.4f}, map {metrics['map']:.4f}")
    assert metrics["queries"] == n and metrics["gallery_size"] == n
    assert 0 < metrics["r@1"] <= metrics["r@10"] <= 1
    assert traced_peak < 512 * 2**20
    assert growth < 2**30


@pytest.mark.parametrize("call, argument", [
    (lambda q, g, k: retrieval_ranks(q, g[:, :3], k, k), "gallery_embeds"),
    (lambda q, g, k: retrieval_ranks(q, g[:0], k, [np.zeros(0, dtype=int)]), "gallery_embeds"),
    (lambda q, g, k: retrieval_ranks(q * np.nan, g, k, k), "query_embeds"),
    (lambda q, g, k: retrieval_ranks(q[0], g, k, k), "query_embeds"),
    (lambda q, g, k: retrieval_ranks(q, g, [k[0][:5]], k), "query_keys"),
    (lambda q, g, k: retrieval_ranks(q, g, [k[0].astype(float)], k), "query_keys"),
    (lambda q, g, k: retrieval_ranks(q, g, k, k + k), "gallery_keys"),
    (lambda q, g, k: retrieval_ranks(q, g, [], []), "query_keys"),
    (lambda q, g, k: retrieval_ranks(q, g, k, k, chunk_size=0), "chunk_size"),
    (lambda q, g, k: retrieval_metrics(q, g, k, k, ks=(0, 5)), "ks"),
], ids=["width", "empty gallery", "not finite", "not a matrix", "key length", "key dtype", "key count", "no keys",
        "chunk size", "cut-off"])
def test_bad_arguments_are_refused_by_name(call, argument, rng):
    embeds = rng.standard_normal((10, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=rf"^{argument}(\[\d+\])?:"):  # a key array is named with its index
        call(embeds, embeds, [np.arange(10)])


# ---- positive keys ---------------------------------------------------------------------------------------------------

def test_positive_keys_match_rows_content_and_attribute_tuples():
    dataset = datasets.Dataset.from_dict({
        "text": ["a red circle", "a blue square", "a red circle", "", "a red circle"],
        "image": ["/d/0.png", "/d/1.png", "/d/2.png", "/d/1.png", None],
        "colour": ["red", "blue", "red", "blue", "red"],
        "shape": ["circle", "square", "circle", "square", None],
    })
    rows, text, image, attributes = positive_keys(dataset, {"text": "text", "image": "image"}, ["colour", "shape"])
    np.testing.assert_array_equal(rows, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(text, [0, 1, 0, -1, 0])  # identical captions share an id; empty: -1
    np.testing.assert_array_equal(image, [0, 1, 2, 1, -1])  # the same file shares an id; no file: -1
    np.testing.assert_array_equal(attributes, [0, 1, 0, 1, -1])  # a row missing an attribute matches none
    # the image of row 3 (the file of row 1) finds the caption of row 1 through the image key
    keys = [rows, text, image, attributes]
    ranks = retrieval_ranks(np.eye(5, dtype=np.float32), np.eye(5, dtype=np.float32), keys, keys)
    assert ranks.positives.tolist() == [3, 2, 3, 2, 3]
    assert len(positive_keys(dataset, {"vision": "image"}, None)) == 2  # the model's modality names work too


def test_positive_keys_of_bytes_cells():
    png = {"bytes": b"\x89PNG-one", "path": None}
    dataset = datasets.Dataset.from_dict({"image": [png, {"bytes": b"\x89PNG-two", "path": None}, png]})
    _, image = positive_keys(dataset, {"image": "image"})
    np.testing.assert_array_equal(image, [0, 1, 0])


@pytest.mark.parametrize("columns, positive_columns, argument", [
    ({"text": "caption"}, None, "columns"),
    ({"smell": "text"}, None, "columns"),
    ({"text": "text"}, ["colour", "size"], "positive_columns"),
])
def test_positive_keys_refuse_unknown_columns(columns, positive_columns, argument):
    dataset = datasets.Dataset.from_dict({"text": ["a", "b"], "colour": ["red", "blue"]})
    with pytest.raises(ValueError, match=f"^{argument}:"):
        positive_keys(dataset, columns, positive_columns)


# ---- zero-shot -------------------------------------------------------------------------------------------------------

def test_zero_shot_accuracy_and_macro_f1_equal_a_hand_computation():
    classes = np.eye(3, dtype=np.float32)  # class c's embedding is the unit vector e_c
    # each item is closest to the class named in `predicted`
    predicted = np.array([0, 0, 1, 1, 1, 0, 2, 2])
    labels = np.array([0, 0, 1, 1, 2, 1, 2, 0])
    items = np.eye(3, dtype=np.float32)[predicted] + 0.1
    result = zero_shot_accuracy(torch.from_numpy(items), classes, labels, class_names=["circle", "square", "triangle"],
                                bootstrap_rounds=200)
    # by hand: correct = items 0, 1, 2, 3, 6 -> 5 / 8
    assert result["accuracy"] == 5 / 8
    # per class (true / predicted / hits): circle 3 / 3 / 2, square 3 / 3 / 2, triangle 2 / 2 / 1;
    # F1 = 2 * hits / (true + predicted): 4/6, 4/6, 2/4
    assert result["macro_f1"] == pytest.approx((4 / 6 + 4 / 6 + 2 / 4) / 3, abs=1e-12)
    assert result["per_class"]["triangle"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert result["confusion_matrix"] == [[2, 0, 1], [1, 2, 0], [0, 1, 1]]
    assert result["chance"] == {"uniform": 1 / 3, "majority": 3 / 8}
    assert result["samples"] == 8 and result["classes"] == ["circle", "square", "triangle"]
    for name in ("accuracy", "macro_f1"):
        low, high = result["ci"][name]
        assert low <= result[name] <= high


def test_zero_shot_ties_go_to_the_first_class():
    classes = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)  # classes 0 and 1 are the same vector
    result = zero_shot_accuracy(np.array([[1, 0]], dtype=np.float32), classes, np.array([0]), bootstrap_rounds=0)
    assert result["accuracy"] == 1.0 and result["ci"] == {"accuracy": None, "macro_f1": None}


@pytest.mark.parametrize("items, labels, argument", [
    (np.zeros((0, 3)), np.zeros(0, dtype=int), "item_embeds"),
    (np.ones((2, 4)), np.array([0, 1]), "class_embeds"),
    (np.ones((2, 3)), np.array([0, 3]), "labels"),
    (np.ones((2, 3)), np.array([0]), "labels"),
    (np.ones((2, 3)), np.array([0.0, 1.0]), "labels"),
])
def test_zero_shot_refuses_bad_arguments_by_name(items, labels, argument):
    with pytest.raises(ValueError, match=f"^{argument}:"):
        zero_shot_accuracy(items.astype(np.float32), np.eye(3, dtype=np.float32), labels)
