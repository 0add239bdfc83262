"""Query latency of `training.index.EmbeddingIndex.search`: exact search in torch against FAISS, by gallery size.

    python benchmarks/retrieval_index.py [--tiny] [--sizes 1000 10000 100000] [--batches 1 64] [--threads 1]
                                         [--hnsw] [--json PATH]

The gallery is random unit vectors (dim 256, seed 0), one modality; queries are 64 other random unit vectors; top-10.
Each cell is the p50 of the milliseconds per `search` call (a call takes a batch of 1 or 64 queries), results turned
into `SearchHit`s included, as a user sees it. FAISS is the index's own backend (`IndexIDMap2(IndexFlatIP)`, exact),
built on the first call, which is timed apart ("faiss build"). "agrees" is how many of the 64 queries got the same
top-10 id set from FAISS as from torch. `--hnsw` adds raw `faiss.IndexHNSWFlat` rows (M=32, efSearch 128), with
recall@10 against exact, to show what an approximate index would give on this data. `auto` in the index uses FAISS
from `AUTO_FAISS_MIN_GALLERY` items up for batches of at most `AUTO_FAISS_MAX_QUERIES`: this script is where those
numbers come from.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from training.index import AUTO_FAISS_MAX_QUERIES, AUTO_FAISS_MIN_GALLERY, EmbeddingIndex

QUERIES = 64
TOP_K = 10


def unit_vectors(count: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(count, dim, generator=generator), dim=1)


def p50_ms(calls: dict[str, object], queries: torch.Tensor, batch: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of each of `calls` on a batch of queries, cycling through the queries. The calls take
    turns on the same batch, so a busy moment of the machine (other processes) falls on both alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for name, call in calls.items():
        call(queries[:batch])  # warm-up
    for repeat in range(repeats):
        start = (repeat * batch) % len(queries)
        part = queries[start:start + batch] if start + batch <= len(queries) else queries[:batch]
        for name, call in calls.items():
            begin = time.perf_counter()
            call(part)
            times[name].append(time.perf_counter() - begin)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def repeats_for(size: int, batch: int, tiny: bool) -> int:
    if tiny:
        return 5
    return max(5, min(200, int(2e7 / (size * batch))))  # about the same time per cell


def measure(size: int, dim: int, batches: list[int], tiny: bool, hnsw: bool) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    gallery = unit_vectors(size, dim, generator)
    queries = unit_vectors(QUERIES, dim, generator)
    index = EmbeddingIndex.from_embeddings({"image": gallery})
    exact_ids = [{hit.id for hit in hits} for hits in index.search(queries, TOP_K, backend="exact")]
    begin = time.perf_counter()
    index._faiss_index("image")  # built lazily by the first FAISS search; timed apart
    faiss_build_ms = 1000 * (time.perf_counter() - begin)
    faiss_ids = [{hit.id for hit in hits} for hits in index.search(queries, TOP_K, backend="faiss")]
    calls = {backend: (lambda q, backend=backend: index.search(q, TOP_K, backend=backend))
             for backend in ("exact", "faiss")}
    if hnsw:
        import faiss

        begin = time.perf_counter()
        graph = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        graph.add(np.ascontiguousarray(gallery.numpy()))
        hnsw_build_ms = 1000 * (time.perf_counter() - begin)
        graph.hnsw.efSearch = 128
        calls["faiss-hnsw"] = lambda q: graph.search(np.ascontiguousarray(q.numpy()), TOP_K)
    latency = {str(batch): p50_ms(calls, queries, batch, repeats_for(size, batch, tiny)) for batch in batches}
    rows = []
    for backend in calls:
        row = {"gallery": size, "backend": backend, "p50_ms": {b: times[backend] for b, times in latency.items()},
               "agrees_top10": None, "queries": QUERIES, "build_ms": None}
        if backend == "faiss":
            row.update(agrees_top10=sum(a == b for a, b in zip(faiss_ids, exact_ids)), build_ms=faiss_build_ms)
        if backend == "faiss-hnsw":
            _, found = graph.search(np.ascontiguousarray(queries.numpy()), TOP_K)
            recall = sum(len(set(row_ids.tolist()) & ids) for row_ids, ids in zip(found, exact_ids))
            row.update(recall_at_10=recall / (TOP_K * QUERIES), build_ms=hnsw_build_ms)
        rows.append(row)
    return rows


def crossover(rows: list[dict], batch: int) -> int | None:
    """The smallest gallery measured from which on FAISS beat torch at this batch size, at that size and every larger
    one (None: not at the largest)."""
    by_size: dict[int, dict[str, float]] = {}
    for row in rows:
        by_size.setdefault(row["gallery"], {})[row["backend"]] = row["p50_ms"][str(batch)]
    since = None
    for size, times in sorted(by_size.items()):
        since = (since or size) if times["faiss"] < times["exact"] else None
    return since


def render(rows: list[dict], batches: list[int]) -> str:
    header = (f"{'gallery':>9}  {'backend':<10}" + "".join(f"  {f'batch {b} ms':>12}" for b in batches)
              + f"  {'build ms':>9}  top-10 vs exact")
    lines = [header, "-" * len(header)]
    for row in rows:
        if row["agrees_top10"] is not None:
            agreement = f"{row['agrees_top10']}/{row['queries']} identical"
        elif "recall_at_10" in row:
            agreement = f"recall {row['recall_at_10']:.3f}"
        else:
            agreement = "(reference)"
        build = f"{row['build_ms']:>9.1f}" if row["build_ms"] is not None else f"{'-':>9}"
        lines.append(f"{row['gallery']:>9,}  {row['backend']:<10}"
                     + "".join(f"  {row['p50_ms'][str(b)]:>12.3f}" for b in batches) + f"  {build}  {agreement}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="galleries of 200 and 2,000 of dim 32, 5 repeats")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="gallery sizes (default 1k 10k 100k)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="queries per search call")
    parser.add_argument("--dim", type=int, default=None, help="embedding dim (default 256; 32 with --tiny)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and FAISS (OpenMP) threads (default: the libraries' own)")
    parser.add_argument("--hnsw", action="store_true", help="add approximate faiss.IndexHNSWFlat rows")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    sizes = args.sizes or ([200, 2_000] if args.tiny else [1_000, 10_000, 100_000])
    dim = args.dim or (32 if args.tiny else 256)
    import faiss

    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)

    rows = [row for size in sizes for row in measure(size, dim, args.batches, args.tiny, args.hnsw)]
    print(f"EmbeddingIndex.search, top-{TOP_K}, dim {dim}, p50 ms per call; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads)")
    print(render(rows, args.batches))
    crossovers = {str(batch): crossover(rows, batch) for batch in args.batches}
    for batch, size in crossovers.items():
        where = f"from {size:,} items" if size else "at none of these sizes"
        print(f"faiss faster than torch for a batch of {batch}: {where}")
    print(f"auto (training/index.py): faiss from {AUTO_FAISS_MIN_GALLERY:,} items, batches of at most "
          f"{AUTO_FAISS_MAX_QUERIES} queries")
    if args.json:
        report = {"tiny": args.tiny, "dim": dim, "top_k": TOP_K, "torch_threads": torch.get_num_threads(),
                  "faiss_threads": faiss.omp_get_max_threads(), "rows": rows, "faiss_faster_from": crossovers,
                  "auto_faiss_min_gallery": AUTO_FAISS_MIN_GALLERY, "auto_faiss_max_queries": AUTO_FAISS_MAX_QUERIES}
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)


if __name__ == "__main__":
    main()
