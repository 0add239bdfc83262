"""A retrieval index users keep: embed a table's items once with a joint embedding model (`MMFusionContrastiveModel`),
save the vectors with the rows, then search them by text, image or audio (`mm-index`, the demo's search tab).

Each item (a row) has up to one embedding per modality (`training.embeddings.embed_items`: each from that modality
alone, unit vectors of `config.projection_dim`). A query is embedded the same way and compared, by cosine similarity,
with the items' embeddings of the modalities asked for; the best matches come first, each item once.

Saved layout (a folder; `save` writes it to a temporary sibling and renames it, so a crash never leaves half an index
under the name):
- `embeddings.safetensors`: `ids` (int64, `(n,)`), one float32 `(n, projection_dim)` tensor per modality ("image",
  "text", "audio"; zeros where an item lacks it) and its bool presence mask `{modality}_present`;
- `metadata.jsonl`: one `{"id": ..., "row": {...}}` per item, in the order of `ids`;
- `media/`: the image and audio cells that came as bytes, so the index needs nothing outside itself;
- `index.json`, written last (its presence marks a complete index): format version, the model's path, projection_dim
  and config hash (a query through another model is refused), the modalities, counts and column names.

Search runs in torch (matmul + topk) or in FAISS (`IndexIDMap2(IndexFlatIP)`: exact inner product, so both give the
same items). "auto" picks by the gallery and query batch sizes measured in `benchmarks/retrieval_index.py`. A FAISS
index is built from the embeddings on its first search (not saved: 65 ms for 100k items of dim 256), then kept in step
by `add` (`add_with_ids`) and `remove` (`remove_ids`), never rebuilt. Nothing is ever embedded twice.

```bash
mm-index build --model outputs/contrastive/model --data data/test.csv --output outputs/index
mm-index search --index outputs/index --text "a red circle" --top_k 5
```
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from modeling_mm.configuration_mm import MODALITY_NAMES
from training.embeddings import column_items, contrastive_model, embed_items, model_modality

logger = logging.getLogger(__name__)

FORMAT = "mm-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
METADATA_FILE = "metadata.jsonl"
MEDIA_DIR = "media"

USER_MODALITIES = ("image", "text", "audio")
MEDIA_MODALITIES = ("image", "audio")
BACKENDS = ("auto", "exact", "faiss")

# "auto" searches with FAISS from AUTO_FAISS_MIN_GALLERY items of one modality up, for batches of at most
# AUTO_FAISS_MAX_QUERIES queries; otherwise with torch. Measured with `benchmarks/retrieval_index.py --threads 1`
# (random unit vectors, dim 256, top-10, p50 ms per `search` call; 2-core CPU shared with other jobs; torch 2.14 with
# MKL, faiss-cpu 1.15.1):
#   gallery   batch 1: torch  faiss   batch 4: torch  faiss   batch 8: torch  faiss   batch 64: torch  faiss
#   1k                 0.12   0.10             0.20   0.18             0.30   0.32              1.5    1.9
#   2k                 0.15   0.11             0.28   0.24             0.38   0.42              2.1    2.9
#   10k                1.26   0.60             2.34   1.63             3.02   2.71              8.4   12.9
#   100k               14.4   5.5              23.7   20.5             27.4   41.6              75    342
# FAISS's flat scan keeps each query's top-k in a heap as it goes, where torch writes every score and then selects:
# 1.4-2.6x faster for one query from 2k items up (below, the gain is under 0.05 ms, not worth a second copy of the
# vectors). At 8 queries FAISS falls behind at 100k items; at 64, torch's matmul wins at every size. Both agree
# exactly (IndexFlatIP). With both libraries at their default 2 threads on this shared machine, timings swung 10x
# from run to run (threads waiting for a core another process holds); one thread was faster and steady. Approximate
# HNSW (M=32, efSearch 128) was rejected: on this data recall@10 was 0.87 at 10k and 0.31 at 100k, and building
# 100k took 100 s.
AUTO_FAISS_MIN_GALLERY = 2_000
AUTO_FAISS_MAX_QUERIES = 4

# keys of a model config that change with how a model was loaded, not with what it computes
_VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "architectures", "auto_map", "name_or_path",
                         "output_hidden_states", "output_attentions", "return_dict", "use_return_dict"}

# magic bytes -> file suffix, for media cells given as bytes (the decoders sniff the format; the suffix helps people)
_MEDIA_SUFFIXES = ((b"\x89PNG", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
                   (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"), (b"fLaC", ".flac"), (b"OggS", ".ogg"),
                   (b"ID3", ".mp3"), (b"\xff\xfb", ".mp3"))


@dataclass
class SearchHit:
    """One item found by `EmbeddingIndex.search`."""

    id: int
    """The item's stable id in the index (ids survive `add` and `remove` and are never reused)."""
    score: float
    """Cosine similarity of the query and the item's embedding in `modality`."""
    modality: str
    """"image", "text" or "audio": which of the item's embeddings matched (its best, when several were searched)."""
    row: dict[str, Any]
    """The item's metadata: "text" (str or None), "image" and "audio" (absolute path or None), plus the other
    columns of its row."""


class EmbeddingIndex:
    """Items' joint embeddings (one per modality an item has), their rows, and search over them.

    Build one from a `datasets.Dataset` and a joint embedding model, save it, load it later and search it by a text,
    an image or an audio clip. Items have stable integer ids; `add` embeds only the new rows and `remove` drops rows,
    neither re-embeds anything. Not safe for concurrent `add`/`remove`; searching from several threads is.

    Example:

    ```python
    >>> import torch
    >>> from training.index import EmbeddingIndex
    >>> vectors = torch.nn.functional.normalize(torch.randn(100, 16), dim=1)
    >>> index = EmbeddingIndex.from_embeddings({"image": vectors}, rows=[{"text": f"item {i}"} for i in range(100)])
    >>> hits = index.search(vectors[:2], top_k=3)
    >>> [hit.id for hit in hits[0]][0], hits[1][0].modality, len(hits[1])
    (0, 'image', 3)
    >>> index.remove([0]); len(index)
    99
    ```

    With a model: `index = EmbeddingIndex.build(model, processor, dataset)`, `index.save("my_index")`,
    `EmbeddingIndex.load("my_index").query(model, processor, text="a red circle", top_k=5)`.
    """

    def __init__(self, ids: torch.Tensor, embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                 rows: list[dict[str, Any]], *, model_path: str | None = None, config_sha256: str | None = None,
                 columns: dict[str, str] | None = None, next_id: int | None = None,
                 owned_media: dict[int, dict[str, Path]] | None = None):
        """Use `build`, `load` or `from_embeddings`; this checks that the parts fit together."""
        if not embeddings:
            raise ValueError("embeddings: an index needs at least one modality")
        unknown = [name for name in embeddings if name not in USER_MODALITIES]
        if unknown:
            raise ValueError(f"embeddings: {unknown} are not modalities; use {', '.join(USER_MODALITIES)}")
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        count = len(ids)
        dims = {tuple(tensor.shape[1:]) for tensor in embeddings.values()}
        if len(dims) != 1 or len(next(iter(dims))) != 1:
            raise ValueError(f"embeddings: expected (items, dim) tensors of one dim, got shapes "
                             f"{ {name: tuple(t.shape) for name, t in embeddings.items()} }")
        for name, tensor in embeddings.items():
            if tensor.shape[0] != count:
                raise ValueError(f"embeddings: {name} has {tensor.shape[0]} rows for {count} ids")
            if present[name].shape != (count,):
                raise ValueError(f"present: {name} has shape {tuple(present[name].shape)}, expected ({count},)")
        if len(rows) != count:
            raise ValueError(f"rows: {len(rows)} rows for {count} ids")
        if len(set(ids.tolist())) != count or bool((ids < 0).any()):
            raise ValueError("ids: must be distinct integers >= 0")
        self.ids = ids
        self.embeddings = {m: embeddings[m].float().contiguous() for m in USER_MODALITIES if m in embeddings}
        self.present = {m: present[m].bool() for m in self.embeddings}
        self.rows = rows
        self.model_path = model_path
        self.config_sha256 = config_sha256
        self.columns = dict(columns) if columns else None
        self.next_id = max(next_id or 0, int(ids.max()) + 1 if count else 0)
        # media the index holds itself (cells given as bytes): id -> {modality: the file now}, in the saved folder's
        # media/ or, until the next save, in a scratch folder of this process (never in a saved folder: only save
        # writes there)
        self._owned_media = owned_media or {}
        self._scratch: Path | None = None
        self._lock = threading.Lock()  # the lazy galleries below are built once, whichever thread searches first
        self._galleries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._faiss: dict[str, Any] = {}
        self._position = {item_id: position for position, item_id in enumerate(self.ids.tolist())}

    # ---- construction ------------------------------------------------------------------------------------------------

    @classmethod
    def from_embeddings(cls, embeddings: dict[str, torch.Tensor], rows: Sequence[dict[str, Any]] | None = None,
                        ids: Sequence[int] | torch.Tensor | None = None,
                        present: dict[str, torch.Tensor] | None = None,
                        model_path: str | None = None) -> EmbeddingIndex:
        """An index of ready-made embeddings: `embeddings` maps "image"/"text"/"audio" to `(items, dim)` tensors
        (scaled to unit length here; an item's vector where `present[modality]` is False is ignored), `rows` the
        items' metadata (default: empty rows), `ids` their ids (default 0..items-1). No model is recorded except
        `model_path`, so only the projection dim is checked when querying. Raises `ValueError` for shapes that do
        not fit."""
        embeddings = {_user_modality(name, "embeddings"): torch.as_tensor(vectors).float()
                      for name, vectors in embeddings.items()}
        embeddings = {name: torch.nn.functional.normalize(vectors, dim=-1) if vectors.ndim == 2 else vectors
                      for name, vectors in embeddings.items()}
        count = next(iter(embeddings.values())).shape[0] if embeddings else 0
        present = {_user_modality(name, "present"): torch.as_tensor(mask) for name, mask in (present or {}).items()}
        present = {name: present.get(name, torch.ones(count, dtype=torch.bool)) for name in embeddings}
        rows = [dict(row) for row in rows] if rows is not None else [{} for _ in range(count)]
        for row in rows:
            for modality in USER_MODALITIES:
                row.setdefault(modality, None)
        ids = torch.arange(count) if ids is None else torch.as_tensor(ids)
        return cls(ids, embeddings, present, rows, model_path=model_path)

    @classmethod
    def build(cls, model: torch.nn.Module, processor, dataset: datasets.Dataset, columns: dict[str, str] | None = None,
              model_path: str | None = None, batch_size: int = 64, progress: bool = True) -> EmbeddingIndex:
        """Embed every row of `dataset` with `model` (a joint embedding model) and `processor`.

        `columns` maps "text"/"image"/"audio" to the data set's columns (default: each column named like a modality
        the model has; a None column leaves that modality out). Image and audio cells are paths (stored absolute) or
        bytes (written into the index's `media/` on `save`). `model_path` is recorded for `mm-index search` (default:
        the folder the model was loaded from). Raises `ValueError` for a model that does not embed, an empty data
        set, a column that is missing or of a modality the model lacks, and an item the processor refuses."""
        base = contrastive_model(model)
        columns = _resolve_columns(dataset, columns, _model_user_modalities(base))
        dim = int(base.config.projection_dim)
        if model_path is None:
            model_path = getattr(base.config, "_name_or_path", None) or getattr(base, "name_or_path", None) or None
        if model_path and Path(model_path).exists():
            model_path = str(Path(model_path).absolute())
        index = cls(torch.zeros(0, dtype=torch.int64), {m: torch.zeros(0, dim) for m in columns},
                    {m: torch.zeros(0, dtype=torch.bool) for m in columns}, [], model_path=model_path,
                    config_sha256=model_config_sha256(base), columns=columns)
        start = time.perf_counter()
        index._append(model, processor, dataset, columns, batch_size, progress)
        logger.info("built an index of %d items (%s) in %.1f s", len(index), index._counts_text(),
                    time.perf_counter() - start)
        return index

    def add(self, model: torch.nn.Module, processor, dataset: datasets.Dataset, batch_size: int = 64,
            columns: dict[str, str] | None = None, progress: bool = False) -> list[int]:
        """Embed the rows of `dataset` and add them; returns their new ids, in row order. Nothing already in the
        index is embedded again (FAISS indexes already built get the new vectors added). `columns` defaults to the
        ones the index was built with and must cover the same modalities. Raises `ValueError` for a model other than
        the index's (`check_model`), an empty data set or a missing column; the index is unchanged then."""
        self.check_model(model)
        if columns is None:
            columns = self.columns or {m: m for m in self.modalities}
        columns = _resolve_columns(dataset, columns, _model_user_modalities(contrastive_model(model)))
        if set(columns) != set(self.modalities):
            raise ValueError(f"columns: the index holds {', '.join(self.modalities)}; the new rows give "
                             f"{', '.join(columns) or 'none'}")
        new_ids = self._append(model, processor, dataset, columns, batch_size, progress)
        logger.info("added %d items (ids %d..%d); the index holds %d", len(new_ids), new_ids[0], new_ids[-1], len(self))
        return new_ids

    def _append(self, model, processor, dataset: datasets.Dataset, columns: dict[str, str], batch_size: int,
                progress: bool) -> list[int]:
        # everything is computed before the index changes, so a refused item leaves it as it was
        dataset = _undecoded(dataset)
        count = len(dataset)
        cells, vectors, present = {}, {}, {}
        for modality, column in columns.items():
            items = column_items(dataset, column, modality)
            has = torch.tensor([item is not None for item in items], dtype=torch.bool)
            block = torch.zeros(count, self.projection_dim)
            if bool(has.any()):
                chosen = has.nonzero().flatten().tolist()
                block[has] = embed_items(model, processor, modality, [items[i] for i in chosen],
                                         batch_size=batch_size, progress=progress)
            cells[modality], vectors[modality], present[modality] = items, block, has
        empty_rows = int((~torch.stack(list(present.values())).any(dim=0)).sum())
        if empty_rows == count:
            raise ValueError(f"dataset: none of its {count} rows has a {' or '.join(columns)} cell "
                             f"(columns {', '.join(columns.values())})")
        if empty_rows:
            logger.warning("%d of %d rows have no %s: they are kept but no search can find them", empty_rows, count,
                           " or ".join(columns))
        new_ids = list(range(self.next_id, self.next_id + count))
        rows, owned = [], {}
        for offset, record in enumerate(dataset):
            row = {name: _json_safe(value) for name, value in record.items()
                   if name not in columns.values() and name not in USER_MODALITIES}
            row["text"] = cells["text"][offset] if "text" in cells else None
            for modality in MEDIA_MODALITIES:
                cell = cells[modality][offset] if modality in cells else None
                row[modality] = self._media_path(new_ids[offset], modality, cell, owned)
            rows.append(row)
        with self._lock:
            self.ids = torch.cat([self.ids, torch.tensor(new_ids, dtype=torch.int64)])
            for modality in self.modalities:
                self.embeddings[modality] = torch.cat([self.embeddings[modality], vectors[modality]])
                self.present[modality] = torch.cat([self.present[modality], present[modality]])
                if modality in self._faiss and bool(present[modality].any()):
                    self._faiss[modality].add_with_ids(vectors[modality][present[modality]].numpy(),
                                                       np.asarray(new_ids, dtype=np.int64)[present[modality].numpy()])
            self.rows.extend(rows)
            self._owned_media.update(owned)
            self._position.update({item_id: len(self._position) + i for i, item_id in enumerate(new_ids)})
            self.next_id += count
            self._galleries.clear()
        return new_ids

    def _media_path(self, item_id: int, modality: str, cell: Any, owned: dict[int, dict[str, Path]]) -> str | None:
        """An image/audio cell as the absolute path stored in the row: bytes are written to a scratch folder, and
        into the index folder's media/ by `save`."""
        if cell is None:
            return None
        if isinstance(cell, (str, os.PathLike)):
            return str(Path(cell).absolute())
        if isinstance(cell, (bytes, bytearray, memoryview)):
            data = bytes(cell)
            if self._scratch is None:
                self._scratch = Path(tempfile.mkdtemp(prefix="mm-index-media-"))
                weakref.finalize(self, shutil.rmtree, self._scratch, True)
            path = self._scratch / f"{item_id}_{modality}{_media_suffix(data)}"
            path.write_bytes(data)
            owned.setdefault(item_id, {})[modality] = path
            return str(path)
        raise ValueError(f"{modality}: row of id {item_id} holds a {type(cell).__name__}; an index stores media as "
                         "paths or bytes (cast a decoded Image/Audio column with decode=False)")

    def remove(self, ids: Sequence[int]) -> None:
        """Remove the items with these ids (FAISS indexes already built drop them with `remove_ids`; nothing is
        re-embedded). Raises `ValueError` naming the ids the index does not hold; the index is unchanged then."""
        try:
            wanted = {int(item_id) for item_id in ids}
        except (TypeError, ValueError):
            raise ValueError(f"ids: {ids!r} must be integers") from None
        unknown = sorted(wanted - self._position.keys())
        if unknown:
            raise ValueError(f"ids: {unknown} are not in the index (it holds {len(self)} items"
                             + (f", ids {int(self.ids.min())}..{int(self.ids.max())})" if len(self) else ")"))
        if not wanted:
            return
        with self._lock:
            keep = torch.tensor([item_id not in wanted for item_id in self.ids.tolist()], dtype=torch.bool)
            self.ids = self.ids[keep]
            for modality in self.modalities:
                self.embeddings[modality] = self.embeddings[modality][keep]
                self.present[modality] = self.present[modality][keep]
            self.rows = [row for row, kept in zip(self.rows, keep.tolist()) if kept]
            for item_id in wanted:
                self._owned_media.pop(item_id, None)
            for faiss_index in self._faiss.values():
                faiss_index.remove_ids(np.asarray(sorted(wanted), dtype=np.int64))
            self._position = {item_id: position for position, item_id in enumerate(self.ids.tolist())}
            self._galleries.clear()
        logger.info("removed %d items; the index holds %d", len(wanted), len(self))

    # ---- save and load -----------------------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> None:
        """Write the index to `folder` (created, or replaced if it holds an index): everything goes to a temporary
        sibling folder first, `index.json` last, then the folder is renamed into place. Raises `ValueError` for a
        `folder` that exists and is not an index (it is never replaced)."""
        from safetensors.torch import save_file

        folder = Path(folder).absolute()
        if folder.exists() and not (folder.is_dir() and ((folder / INDEX_FILE).exists() or not any(folder.iterdir()))):
            raise ValueError(f"folder: {str(folder)!r} exists and is not an mm-index folder; refusing to replace it")
        folder.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.saving-", dir=folder.parent))
        try:
            temporary.chmod(0o755)  # mkdtemp's 0o700 would make the renamed index private to this user
            tensors = {"ids": self.ids.contiguous()}
            for modality in self.modalities:
                tensors[modality] = self.embeddings[modality].contiguous()
                tensors[f"{modality}_present"] = self.present[modality].contiguous()
            save_file(tensors, temporary / EMBEDDINGS_FILE, metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
            if self._owned_media:
                (temporary / MEDIA_DIR).mkdir()
            for paths in self._owned_media.values():
                for path in paths.values():
                    shutil.copyfile(path, temporary / MEDIA_DIR / path.name)
            with open(temporary / METADATA_FILE, "w", encoding="utf-8") as file:
                for item_id, row in zip(self.ids.tolist(), self.rows):
                    stored = dict(row)
                    for modality, path in self._owned_media.get(item_id, {}).items():
                        stored[modality] = f"{MEDIA_DIR}/{path.name}"  # relative: the folder may move
                    file.write(json.dumps({"id": item_id, "row": stored}, ensure_ascii=False) + "\n")
            _write_synced(temporary / INDEX_FILE, json.dumps(self._info(), indent=2) + "\n",
                          before=[temporary / EMBEDDINGS_FILE, temporary / METADATA_FILE])
            _replace_folder(temporary, folder)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        self._adopt_media_folder(folder / MEDIA_DIR)
        logger.info("saved an index of %d items (%s) to %s", len(self), self._counts_text(), folder)

    def _adopt_media_folder(self, media_root: Path) -> None:
        """After a save, rows point at the saved copies of the owned media; the scratch folder goes."""
        for item_id, paths in self._owned_media.items():
            row = self.rows[self._position[item_id]]
            for modality, path in paths.items():
                paths[modality] = media_root / path.name
                row[modality] = str(media_root / path.name)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def _info(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model_path": self.model_path,
            "projection_dim": self.projection_dim, "model_config_sha256": self.config_sha256,
            "modalities": list(self.modalities), "counts": self.counts(), "columns": self.columns,
            "next_id": self.next_id,
        }

    @classmethod
    def load(cls, folder: str | os.PathLike) -> EmbeddingIndex:
        """The index `save` wrote to `folder`. Raises `ValueError` for a folder that is not a complete index (no
        `index.json`, which `save` writes last; a missing file; counts that disagree) or of a newer format."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder).absolute()
        if not folder.is_dir():
            raise ValueError(f"index: {str(folder)!r} is not a folder")
        if not (folder / INDEX_FILE).exists():
            raise ValueError(f"index: {str(folder)!r} is not a complete mm-index folder: it has no {INDEX_FILE}, "
                             "which save writes last (an unfinished save, or not an index)")
        try:
            info = json.loads((folder / INDEX_FILE).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"index: {str(folder / INDEX_FILE)!r} is not valid JSON ({error})") from error
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise ValueError(f"index: {str(folder / INDEX_FILE)!r} is not an mm-index file")
        version = info.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"index: format_version {version!r} is not one this mm-fusion reads (up to "
                             f"{FORMAT_VERSION}); upgrade mm-fusion")
        for name in (EMBEDDINGS_FILE, METADATA_FILE):
            if not (folder / name).exists():
                raise ValueError(f"index: {str(folder)!r} is not a complete mm-index folder: {name} is missing")
        try:
            tensors = load_file(folder / EMBEDDINGS_FILE)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"index: {str(folder / EMBEDDINGS_FILE)!r} cannot be read ({error})") from error
        records = [json.loads(line) for line in (folder / METADATA_FILE).read_text(encoding="utf-8").splitlines()
                   if line.strip()]
        modalities = list(info.get("modalities") or [])
        missing = [name for name in ["ids", *modalities, *(f"{m}_present" for m in modalities)] if name not in tensors]
        if missing:
            raise ValueError(f"index: {EMBEDDINGS_FILE} lacks the tensors {missing}")
        counts = {"items": len(tensors["ids"]), **{m: int(tensors[f"{m}_present"].sum()) for m in modalities}}
        if counts != info.get("counts") or len(records) != counts["items"]:
            raise ValueError(f"index: {str(folder)!r} is inconsistent: {INDEX_FILE} counts {info.get('counts')}, "
                             f"the tensors hold {counts} and {METADATA_FILE} {len(records)} rows")
        if [record["id"] for record in records] != tensors["ids"].tolist():
            raise ValueError(f"index: the ids of {METADATA_FILE} and {EMBEDDINGS_FILE} differ")
        dims = {tensors[m].shape[-1] for m in modalities}
        if dims != {info.get("projection_dim")}:
            raise ValueError(f"index: embeddings of dim {sorted(dims)} but projection_dim {info.get('projection_dim')}")
        rows, owned = [], {}
        for record in records:
            row = record["row"]
            for modality in MEDIA_MODALITIES:
                value = row.get(modality)
                if isinstance(value, str) and value.startswith(f"{MEDIA_DIR}/"):
                    owned.setdefault(record["id"], {})[modality] = folder / value
                    row[modality] = str(folder / value)
            rows.append(row)
        return cls(tensors["ids"], {m: tensors[m] for m in modalities},
                   {m: tensors[f"{m}_present"] for m in modalities}, rows, model_path=info.get("model_path"),
                   config_sha256=info.get("model_config_sha256"), columns=info.get("columns"),
                   next_id=info.get("next_id"), owned_media=owned)

    # ---- search ------------------------------------------------------------------------------------------------------

    def search(self, query_embeds: torch.Tensor, top_k: int = 10, modalities: Sequence[str] | None = None,
               backend: str = "auto") -> list[list[SearchHit]]:
        """For each query of `query_embeds` `(queries, projection_dim)` (unit vectors; a `(dim,)` vector is one
        query), the `top_k` items best matching it, best first: items are compared through their embeddings of
        `modalities` (default: all the index holds) and each item appears once, with the modality that matched
        best. Ties are broken by the smaller id. `backend`: "exact" (torch), "faiss" (an exact FAISS inner-product
        index, built on first use and kept in step by add/remove) or "auto" (FAISS for a few queries against a large
        gallery: `AUTO_FAISS_MIN_GALLERY`). Raises `ValueError` for top_k < 1, an unknown modality or backend, and
        queries of another dimension or not finite."""
        top_k = _check_top_k(top_k)
        if backend not in BACKENDS:
            raise ValueError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
        modalities = self._modalities_to_search(modalities)
        queries = torch.as_tensor(query_embeds).detach().float().cpu()
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.projection_dim:
            raise ValueError(f"query_embeds: shape {tuple(queries.shape)}; expected (queries, {self.projection_dim}) "
                             f"(the index's projection_dim)")
        if not bool(torch.isfinite(queries).all()):
            raise ValueError("query_embeds: holds NaN or infinite values")
        norms = queries.norm(dim=1)
        if bool((norms == 0).any()):
            raise ValueError(f"query_embeds: query {int((norms == 0).nonzero()[0])} is a zero vector")
        queries = queries / norms[:, None]  # a no-op up to rounding for embed_items' unit vectors; scores are cosines
        best: list[dict[int, tuple[float, str]]] = [{} for _ in range(len(queries))]
        for modality in modalities:
            gallery, gallery_ids = self._gallery(modality)
            if len(gallery_ids) == 0 or len(queries) == 0:
                continue
            k = min(top_k, len(gallery_ids))
            use_faiss = backend == "faiss" or (backend == "auto" and len(gallery_ids) >= AUTO_FAISS_MIN_GALLERY
                                               and len(queries) <= AUTO_FAISS_MAX_QUERIES)
            if use_faiss:
                scores, found = self._faiss_index(modality).search(np.ascontiguousarray(queries.numpy()), k)
            else:
                top = torch.topk(queries @ gallery.T, k, dim=1)  # (queries, k)
                scores, found = top.values.numpy(), gallery_ids[top.indices].numpy()
            for query_best, query_scores, query_ids in zip(best, scores.tolist(), found.tolist()):
                for score, item_id in zip(query_scores, query_ids):
                    if item_id >= 0 and (item_id not in query_best or score > query_best[item_id][0]):
                        query_best[item_id] = (score, modality)
        results = []
        for query_best in best:
            ranked = sorted(query_best.items(), key=lambda entry: (-entry[1][0], entry[0]))[:top_k]
            results.append([SearchHit(id=item_id, score=score, modality=modality,
                                      row=dict(self.rows[self._position[item_id]]))
                            for item_id, (score, modality) in ranked])
        return results

    def query(self, model: torch.nn.Module, processor, text: str | None = None, image: Any = None, audio: Any = None,
              top_k: int = 10, modalities: Sequence[str] | None = None) -> list[SearchHit]:
        """Embed one query (exactly one of `text`, `image`, `audio`: a text; a path, bytes, PIL image or array; a path,
        bytes or (sampling_rate, array)) with `model` and `processor`, and `search` for it. Raises `ValueError` for
        none or several queries, an empty query, a model without that tower or other than the index's, and the
        arguments `search` refuses."""
        given = {name: value for name, value in (("text", text), ("image", image), ("audio", audio))
                 if value is not None}
        if len(given) != 1:
            raise ValueError(f"query: give exactly one of text, image, audio (got {', '.join(given) or 'none'})")
        (modality, value), = given.items()
        if isinstance(value, (str, bytes)) and not value.strip():
            raise ValueError(f"{modality}: the query is empty")
        _check_top_k(top_k)
        self._modalities_to_search(modalities)
        self.check_model(model)
        start = time.perf_counter()
        query_embeds = embed_items(model, processor, modality, [value])
        hits = self.search(query_embeds, top_k=top_k, modalities=modalities)[0]
        logger.info("searched %d items for a%s %s query in %.0f ms", len(self), "n" if modality == "image" else "",
                    modality, 1000 * (time.perf_counter() - start))
        return hits

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise `ValueError` when `model` cannot have made this index's embeddings: another projection_dim, or
        (for an index built from a model) another config. Weights are not compared: a model fine-tuned further with
        the same config passes, and its embeddings drift from the index's."""
        base = contrastive_model(model)
        dim = int(base.config.projection_dim)
        source = f" (built with {self.model_path})" if self.model_path else ""
        if dim != self.projection_dim:
            raise ValueError(f"model: its projection_dim {dim} differs from the index's {self.projection_dim}{source}; "
                             "embeddings of different models cannot be compared")
        if self.config_sha256 is not None and model_config_sha256(base) != self.config_sha256:
            raise ValueError(f"model: its config differs from the one of the model that built the index{source}; "
                             "embeddings of different models cannot be compared: use that model or rebuild the index")

    # ---- what it holds -----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"EmbeddingIndex({len(self)} items: {self._counts_text()}; dim {self.projection_dim})"

    @property
    def modalities(self) -> tuple[str, ...]:
        """The user names ("image", "text", "audio") of the modalities the index holds embeddings for."""
        return tuple(self.embeddings)

    @property
    def projection_dim(self) -> int:
        return int(next(iter(self.embeddings.values())).shape[1])

    def counts(self) -> dict[str, int]:
        """{"items": items, modality: items with an embedding of that modality}."""
        return {"items": len(self), **{m: int(self.present[m].sum()) for m in self.modalities}}

    def _counts_text(self) -> str:
        return ", ".join(f"{count} {m}" for m, count in self.counts().items() if m != "items")

    def _modalities_to_search(self, modalities: Sequence[str] | None) -> tuple[str, ...]:
        if modalities is None:
            return self.modalities
        if isinstance(modalities, str):
            modalities = [modalities]
        chosen = tuple(dict.fromkeys(_user_modality(name, "modalities") for name in modalities))
        lacking = [m for m in chosen if m not in self.modalities]
        if not chosen or lacking:
            raise ValueError(f"modalities: {lacking or list(modalities)} not in the index (it holds "
                             f"{', '.join(self.modalities)})")
        return chosen

    def _gallery(self, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings and ids of the items that have `modality`, kept between searches (until add/remove)."""
        with self._lock:
            if modality not in self._galleries:
                mask = self.present[modality]
                if bool(mask.all()):
                    self._galleries[modality] = (self.embeddings[modality], self.ids)
                else:
                    self._galleries[modality] = (self.embeddings[modality][mask], self.ids[mask])
            return self._galleries[modality]

    def _faiss_index(self, modality: str):
        """An exact inner-product FAISS index of the modality's gallery, by item id; built on first use, then kept in
        step by add (`add_with_ids`) and remove (`remove_ids`), never rebuilt."""
        import faiss

        gallery, gallery_ids = self._gallery(modality)
        with self._lock:
            if modality not in self._faiss:
                faiss_index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.projection_dim))
                faiss_index.add_with_ids(np.ascontiguousarray(gallery.numpy()), gallery_ids.numpy())
                self._faiss[modality] = faiss_index
            return self._faiss[modality]


# ---- helpers ---------------------------------------------------------------------------------------------------------


def model_config_sha256(model: torch.nn.Module) -> str:
    """A hash of what in `model`'s config decides its embeddings (not where or how it was loaded)."""
    config = contrastive_model(model).config.to_dict()
    return hashlib.sha256(json.dumps(_stable_config(config), sort_keys=True, default=str).encode()).hexdigest()


def _stable_config(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _stable_config(item) for key, item in value.items()
                if not str(key).startswith("_") and key not in _VOLATILE_CONFIG_KEYS}
    if isinstance(value, (list, tuple)):
        return [_stable_config(item) for item in value]
    return value


def _user_modality(name: str, field_name: str) -> str:
    try:
        return MODALITY_NAMES[model_modality(name)].user
    except ValueError:
        raise ValueError(f"{field_name}: {name!r} is not one of {', '.join(USER_MODALITIES)}") from None


def _model_user_modalities(base: torch.nn.Module) -> tuple[str, ...]:
    return tuple(MODALITY_NAMES[m].user for m in base.model.modalities)


def _check_top_k(top_k: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k: {top_k!r} must be an integer >= 1")
    return int(top_k)


def _resolve_columns(dataset: datasets.Dataset, columns: dict[str, str | None] | None,
                     model_modalities: Sequence[str]) -> dict[str, str]:
    """{user modality: column}, in USER_MODALITIES order, checked against the data set and the model's towers."""
    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"dataset: a DatasetDict (splits {list(dataset)}); pass one split, e.g. dataset['test']")
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"dataset: expected a datasets.Dataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset: has no rows; an index needs at least one item")
    if columns is None:
        resolved = {m: m for m in USER_MODALITIES if m in dataset.column_names and m in model_modalities}
    else:
        resolved = {}
        for key, column in columns.items():
            modality = _user_modality(key, "columns")
            if column is None:
                continue
            if column not in dataset.column_names:
                raise ValueError(f"columns: the {modality} column {column!r} is not in the data set (its columns: "
                                 f"{', '.join(dataset.column_names)})")
            if modality not in model_modalities:
                raise ValueError(f"columns: the model has no {modality} tower (it embeds "
                                 f"{', '.join(model_modalities)}), so the {column!r} column cannot be indexed")
            resolved[modality] = column
    if not resolved:
        raise ValueError(f"columns: the data set has no column to embed (the model embeds "
                         f"{', '.join(model_modalities)}; the data set's columns: {', '.join(dataset.column_names)})")
    return {m: resolved[m] for m in USER_MODALITIES if m in resolved}


def _undecoded(dataset: datasets.Dataset) -> datasets.Dataset:
    """Image/Audio features cast to decode=False: cells become {"bytes", "path"}, which the index stores as files."""
    for column, feature in dataset.features.items():
        if isinstance(feature, (datasets.Image, datasets.Audio)) and feature.decode:
            dataset = dataset.cast_column(column, type(feature)(decode=False))
    return dataset


def _media_suffix(data: bytes) -> str:
    if data[:4] == b"RIFF":
        return ".webp" if data[8:12] == b"WEBP" else ".wav"
    for magic, suffix in _MEDIA_SUFFIXES:
        if data.startswith(magic):
            return suffix
    return ".bin"


def _json_safe(value: Any) -> Any:
    """A row's other cells as JSON can hold them (bytes as a size note; numpy values as Python values)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(bytes(value))} bytes>"
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return _json_safe(value.tolist())
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return str(value)


def _write_synced(path: Path, text: str, before: Sequence[Path] = ()) -> None:
    """Write `path` after flushing `before` to disk: the marker file must never land before what it vouches for."""
    for earlier in before:
        with open(earlier, "rb") as file:
            os.fsync(file.fileno())
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _replace_folder(source: Path, target: Path) -> None:
    """Rename `source` to `target`; an existing `target` is moved aside first and deleted after (a crash in
    between leaves both the old index, `.{name}.old-*`, and the new one, `.{name}.saving-*`, complete)."""
    if not target.exists():
        os.replace(source, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    aside.rmdir()
    os.replace(target, aside)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


# ---- mm-index --------------------------------------------------------------------------------------------------------


def load_model(model_path: str) -> tuple[torch.nn.Module, Any]:
    """A saved joint embedding model and its processor, on the CPU in eval mode. Raises `ValueError` for a missing
    folder and for a model that is not an `MMFusionContrastiveModel`."""
    from transformers import AutoConfig

    import modeling_mm  # registers mm_fusion with the Auto classes
    from processors import MMFusionProcessor

    if not Path(model_path).exists() and (model_path.startswith((".", "/", "~")) or model_path.count("/") > 1):
        raise ValueError(f"model: no folder {model_path!r}")
    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        raise ValueError(f"model: cannot load {model_path!r}: {error}") from error
    if getattr(config, "model_type", None) != "mm_fusion" or not getattr(config, "is_contrastive", False):
        raise ValueError(f"model: {model_path!r} is not a joint embedding model (an MMFusionContrastiveModel, "
                         "mm-train --task contrastive)")
    if (Path(model_path) / "adapter_config.json").exists():
        from training.lora import load_trained_model

        model = load_trained_model(model_path).merge_and_unload()
    else:
        model = modeling_mm.MMFusionContrastiveModel.from_pretrained(model_path)
    contrastive_model(model)
    return model.eval(), MMFusionProcessor.from_pretrained(model_path)


def load_rows(source: str, split: str | None, columns: dict[str, str | None]) -> datasets.Dataset:
    """One split of `source` (anything `training.data.load_table` reads; a single table file is used whole); relative
    media paths resolved against the table's folder. Raises `ValueError` naming `split` when it is missing or needed."""
    from training.data import SPLIT_NAMES, load_table

    media_columns = [columns.get(m) or m for m in MEDIA_MODALITIES]
    table = load_table(source, media_columns)
    if Path(source).is_file():
        return table["train"]
    if split is not None:
        key = SPLIT_NAMES.get(split, split)
        if key not in table:
            raise ValueError(f"split: {split!r} is not a split of {source!r} (it has {', '.join(table)})")
        return table[key]
    if len(table) != 1:
        raise ValueError(f"split: {source!r} has the splits {', '.join(table)}; choose one with --split")
    return next(iter(table.values()))


def _columns_from_arguments(arguments: argparse.Namespace, dataset: datasets.Dataset,
                            defaults: dict[str, str] | None, model_modalities: Sequence[str]) -> dict[str, str | None]:
    """The flags' columns ("none" leaves a modality out), else `defaults`, else the columns named like the model's
    modalities."""
    columns: dict[str, str | None] = {}
    for modality in USER_MODALITIES:
        flag = getattr(arguments, f"{modality}_column")
        if flag is not None:
            columns[modality] = None if flag.lower() == "none" else flag
        elif defaults is not None:
            columns[modality] = defaults.get(modality)
        else:
            present = modality in dataset.column_names and modality in model_modalities
            columns[modality] = modality if present else None
    return columns


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="A CSV/JSON/Parquet file, a folder (imagefolder layout or "
                        "save_to_disk) or a Hub data set name.")
    parser.add_argument("--split", default=None, help="The split to index (default: the only one; a table file is "
                        "used whole).")
    for modality in USER_MODALITIES:
        parser.add_argument(f"--{modality}_column", default=None, help=f"Column of the {modality} cells (default: "
                            f"'{modality}' when the data has it; 'none' leaves {modality} out).")
    parser.add_argument("--batch_size", type=int, default=64, help="Items embedded per forward pass.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm-index", description="Embed a data set once into a saved index, then "
                                     "search it by text, image or audio with a joint embedding model.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="Embed a data set into a new index.")
    build.add_argument("--model", required=True, help="A joint embedding model folder (mm-train --task contrastive).")
    _data_arguments(build)
    build.add_argument("--output", required=True, help="The index folder to write (replaced if it holds an index).")
    search = commands.add_parser("search", help="Search an index by a text, an image or an audio clip.")
    search.add_argument("--index", required=True, help="An index folder written by mm-index build.")
    search.add_argument("--model", default=None, help="The model to embed the query (default: the one the index "
                        "records).")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="A text query.")
    query.add_argument("--image", help="An image file as the query.")
    query.add_argument("--audio", help="An audio file as the query.")
    search.add_argument("--top_k", type=int, default=5, help="How many items to show.")
    search.add_argument("--modalities", nargs="+", default=None, help="The items' modalities to compare the query "
                        "with (default: all the index holds).")
    search.add_argument("--backend", choices=BACKENDS, default="auto", help="exact (torch), faiss, or auto.")
    search.add_argument("--json", action="store_true", help="Print the hits as JSON instead of a table.")
    add = commands.add_parser("add", help="Embed more rows into an index.")
    add.add_argument("--index", required=True, help="An index folder written by mm-index build.")
    add.add_argument("--model", default=None, help="The model (default: the one the index records).")
    _data_arguments(add)
    remove = commands.add_parser("remove", help="Remove items from an index by id.")
    remove.add_argument("--index", required=True, help="An index folder written by mm-index build.")
    remove.add_argument("--ids", type=int, nargs="+", required=True, help="The ids of the items to remove.")
    return parser


def _recorded_model(index: EmbeddingIndex, model_path: str | None) -> str:
    if model_path:
        return model_path
    if not index.model_path:
        raise ValueError("model: the index records no model; pass --model")
    return index.model_path


def format_hits(hits: Sequence[SearchHit]) -> str:
    """A table of hits: rank, score, modality, id, and the matched text or file."""
    lines = [f"{'rank':>4}  {'score':>7}  {'modality':<8}  {'id':>6}  item"]
    for rank, hit in enumerate(hits, start=1):
        lines.append(f"{rank:>4}  {hit.score:>7.4f}  {hit.modality:<8}  {hit.id:>6}  {hit.row.get(hit.modality)}")
    return "\n".join(lines)


def run(arguments: argparse.Namespace) -> int:
    """What one `mm-index` command does; raises `ValueError` for bad input."""
    if arguments.command == "build":
        model, processor = load_model(arguments.model)
        base = contrastive_model(model)
        columns = {m: arguments.__dict__[f"{m}_column"] for m in USER_MODALITIES}
        dataset = load_rows(arguments.data, arguments.split, columns)
        columns = _columns_from_arguments(arguments, dataset, None, _model_user_modalities(base))
        index = EmbeddingIndex.build(model, processor, dataset, columns=columns, model_path=arguments.model,
                                     batch_size=arguments.batch_size, progress=True)
        index.save(arguments.output)
        return 0
    index = EmbeddingIndex.load(arguments.index)
    if arguments.command == "remove":
        index.remove(arguments.ids)
        index.save(arguments.index)
        return 0
    if arguments.command == "search":
        _check_top_k(arguments.top_k)  # before the model loads
    model, processor = load_model(_recorded_model(index, arguments.model))
    if arguments.command == "add":
        columns = {m: arguments.__dict__[f"{m}_column"] for m in USER_MODALITIES}
        dataset = load_rows(arguments.data, arguments.split, {**(index.columns or {}), **columns})
        columns = _columns_from_arguments(arguments, dataset, index.columns, index.modalities)
        index.add(model, processor, dataset, batch_size=arguments.batch_size, columns=columns, progress=True)
        index.save(arguments.index)
        return 0
    hits = index.query(model, processor, text=arguments.text, image=arguments.image, audio=arguments.audio,
                       top_k=arguments.top_k, modalities=arguments.modalities)
    if arguments.json:
        print(json.dumps([{"rank": rank, "id": hit.id, "score": hit.score, "modality": hit.modality, "row": hit.row}
                          for rank, hit in enumerate(hits, start=1)], indent=2, ensure_ascii=False))
    else:
        print(format_hits(hits))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`mm-index build|search|add|remove`: returns 0 on success; prints `mm-index: error: ...` and returns 2 for bad
    input (argparse's own usage errors also return 2)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        arguments = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed by argparse
        return int(exit_.code or 0)
    if getattr(arguments, "batch_size", 1) < 1:
        print(f"mm-index: error: batch_size: {arguments.batch_size} must be >= 1", file=sys.stderr)
        return 2
    try:
        return run(arguments)
    except ValueError as error:
        print(f"mm-index: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
