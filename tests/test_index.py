"""training/index.py: an index built from a CSV (paths) or a data set (bytes cells) holds each row's embeddings as
embed_items gives them; save -> load is exact (tensors, rows, results); add then remove gives the results of an index
built from the remaining rows; exact and FAISS search agree on a 20,000-item gallery; mm-index build/search/add/remove
work end to end; bad input raises ValueError naming the field; an unfinished folder is refused and a failed save
loses nothing."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch

from conftest import FUSION_KWARGS
from modeling_mm import MMFusionContrastiveModel
from processors import MMFusionProcessor
from training import index as index_module
from training.embeddings import column_items, embed_items
from training.index import INDEX_FILE, EmbeddingIndex, SearchHit, load_rows, main

ROWS = 20  # of the built-in sample's test.csv
FIRST = 12  # rows the add/remove test builds from; the rest are added


@pytest.fixture(scope="module")
def model_and_processor(contrastive_model_dir):
    return (MMFusionContrastiveModel.from_pretrained(contrastive_model_dir).eval(),
            MMFusionProcessor.from_pretrained(contrastive_model_dir))


@pytest.fixture(scope="module")
def items_dir(sample_dir, tmp_path_factory) -> Path:
    """20 rows of the sample's test.csv with their image and audio files copied beside a CSV of relative paths, plus
    the same rows split in two CSVs (first 12, last 8) for add."""
    folder = tmp_path_factory.mktemp("items")
    with open(sample_dir / "test.csv", newline="") as file:
        reader = csv.DictReader(file)
        fields, rows = reader.fieldnames, [row for _, row in zip(range(ROWS), reader)]
    for row in rows:
        for column in ("image", "audio"):
            (folder / row[column]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sample_dir / row[column], folder / row[column])
    for name, part in (("items.csv", rows), ("first.csv", rows[:FIRST]), ("rest.csv", rows[FIRST:])):
        with open(folder / name, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fields)
            writer.writeheader()
            writer.writerows(part)
    return folder


@pytest.fixture(scope="module")
def items(items_dir) -> datasets.Dataset:
    return load_rows(str(items_dir / "items.csv"), None, {})


@pytest.fixture(scope="module")
def built(model_and_processor, items) -> EmbeddingIndex:
    model, processor = model_and_processor
    return EmbeddingIndex.build(model, processor, items, model_path="tiny-contrastive", batch_size=8, progress=False)


def hit_keys(results: list[list[SearchHit]]) -> list[list[tuple[int, str]]]:
    return [[(hit.id, hit.modality) for hit in hits] for hits in results]


def test_build_holds_each_rows_embeddings_and_metadata(built, items, items_dir, model_and_processor):
    model, processor = model_and_processor
    assert len(built) == ROWS and built.modalities == ("image", "text", "audio")
    assert built.counts() == {"items": ROWS, "image": ROWS, "text": ROWS, "audio": ROWS}
    assert built.ids.tolist() == list(range(ROWS)) and built.model_path == "tiny-contrastive"
    for modality in built.modalities:  # each item alone: the same vectors in batches of 8 as in one batch
        expected = embed_items(model, processor, modality, column_items(items, modality, modality))
        torch.testing.assert_close(built.embeddings[modality], expected, atol=1e-5, rtol=0)
    first = built.rows[0]
    assert first["text"] == items[0]["text"] and first["label"] == items[0]["label"]
    assert first["image"] == str(items_dir / items[0]["image"]) and Path(first["image"]).is_absolute()
    assert Path(first["audio"]).is_file()
    hits = built.query(model, processor, text=items[5]["text"], top_k=3, modalities=["text"])
    assert hits[0].modality == "text" and hits[0].row["text"] == items[5]["text"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)  # its own caption (others may repeat it)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_search_merges_modalities_each_item_once(built):
    results = built.search(built.embeddings["image"][:4], top_k=ROWS)
    for query, hits in enumerate(results):
        assert len({hit.id for hit in hits}) == len(hits) == ROWS  # every item once, by its best modality
        assert hits[0].id == query and hits[0].modality == "image" and hits[0].score == pytest.approx(1.0, abs=1e-5)
        for hit in hits:  # the score shown is the best of the item's three
            position = built.ids.tolist().index(hit.id)
            best = max(float(built.embeddings[m][position] @ built.embeddings["image"][query])
                       for m in built.modalities)
            assert hit.score == pytest.approx(best, abs=1e-5)


def test_save_then_load_is_exact(built, tmp_path):
    built.save(tmp_path / "index")
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["embeddings.safetensors", "index.json",
                                                                      "metadata.jsonl"]
    assert [p.name for p in tmp_path.iterdir()] == ["index"]  # no temporary folder left
    info = json.loads((tmp_path / "index" / INDEX_FILE).read_text())
    assert info["projection_dim"] == 16 and info["modalities"] == ["image", "text", "audio"]
    assert info["counts"]["items"] == ROWS and len(info["model_config_sha256"]) == 64
    loaded = EmbeddingIndex.load(tmp_path / "index")
    assert torch.equal(loaded.ids, built.ids) and loaded.rows == built.rows
    for modality in built.modalities:
        assert torch.equal(loaded.embeddings[modality], built.embeddings[modality])
        assert torch.equal(loaded.present[modality], built.present[modality])
    assert (loaded.model_path, loaded.config_sha256, loaded.columns, loaded.next_id) == (
        built.model_path, built.config_sha256, built.columns, built.next_id)
    queries = torch.cat([built.embeddings["text"][:3], built.embeddings["audio"][-3:]])
    for modalities in (None, ["audio"], ["image", "text"]):
        before, after = built.search(queries, 5, modalities), loaded.search(queries, 5, modalities)
        assert hit_keys(after) == hit_keys(before)
        assert [[h.score for h in hits] for hits in after] == [[h.score for h in hits] for hits in before]


def test_bytes_cells_are_written_into_the_index(model_and_processor, items, tmp_path):
    model, processor = model_and_processor
    images = [Path(p).read_bytes() for p in items["image"][:6]]
    clips = [Path(p).read_bytes() for p in items["audio"][:6]]
    texts = [items[i]["text"] if i % 2 else None for i in range(6)]  # half the items lack a text
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in images], "audio": clips, "text": texts, "n": list(range(6))},
        features=datasets.Features({"image": datasets.Image(), "audio": datasets.Value("binary"),
                                    "text": datasets.Value("string"), "n": datasets.Value("int64")}))
    index = EmbeddingIndex.build(model, processor, dataset, progress=False)
    assert index.counts() == {"items": 6, "image": 6, "text": 3, "audio": 6}
    assert index.present["text"].tolist() == [False, True] * 3
    text_hits = index.search(index.embeddings["text"][1], top_k=6, modalities=["text"])[0]
    assert sorted(hit.id for hit in text_hits) == [1, 3, 5]  # an item without text is never a text match
    index.save(tmp_path / "index")
    media = sorted(p.name for p in (tmp_path / "index" / "media").iterdir())
    assert media == sorted([f"{i}_image.png" for i in range(6)] + [f"{i}_audio.wav" for i in range(6)])
    assert index.rows[2]["image"] == str(tmp_path / "index" / "media" / "2_image.png")
    assert Path(index.rows[2]["image"]).read_bytes() == images[2] and index.rows[2]["n"] == 2
    shutil.move(tmp_path / "index", tmp_path / "moved")  # self-contained: the folder can move
    loaded = EmbeddingIndex.load(tmp_path / "moved")
    assert loaded.rows[4]["audio"] == str(tmp_path / "moved" / "media" / "4_audio.wav")
    hits = loaded.query(model, processor, audio=loaded.rows[4]["audio"], top_k=1, modalities=["audio"])
    assert hits[0].id == 4 and hits[0].score == pytest.approx(1.0, abs=1e-5)
    hits = loaded.query(model, processor, image=images[3], top_k=1)
    assert (hits[0].id, hits[0].modality) == (3, "image")
    loaded.remove([0])
    loaded.add(model, processor, dataset.select([5]))  # its bytes wait outside the saved folder until save
    assert len(list((tmp_path / "moved" / "media").iterdir())) == 12
    loaded.save(tmp_path / "moved")
    media = sorted(p.name for p in (tmp_path / "moved" / "media").iterdir())
    assert media == sorted([f"{i}_image.png" for i in range(1, 7)] + [f"{i}_audio.wav" for i in range(1, 7)])
    last = EmbeddingIndex.load(tmp_path / "moved").rows[-1]
    assert last["image"] == str(tmp_path / "moved" / "media" / "6_image.png")


def test_add_then_remove_equals_building_from_the_remaining_rows(model_and_processor, items_dir, tmp_path):
    model, processor = model_and_processor
    first, rest = (load_rows(str(items_dir / name), None, {}) for name in ("first.csv", "rest.csv"))
    index = EmbeddingIndex.build(model, processor, first, batch_size=8, progress=False)
    queries = index.embeddings["text"][:4]
    index.search(queries, backend="faiss")  # the FAISS side exists before add/remove: it is updated, not rebuilt
    assert index.add(model, processor, rest, batch_size=8) == list(range(FIRST, ROWS))
    removed = [3, 7, 15]
    index.remove(removed)
    remaining = [i for i in range(ROWS) if i not in removed]
    assert index.ids.tolist() == remaining
    direct_rows = load_rows(str(items_dir / "items.csv"), None, {}).select(remaining)
    direct = EmbeddingIndex.build(model, processor, direct_rows, batch_size=8, progress=False)
    assert direct.ids.tolist() == list(range(len(remaining)))
    for modality in index.modalities:
        torch.testing.assert_close(index.embeddings[modality], direct.embeddings[modality], atol=1e-6, rtol=0)
    for backend in ("exact", "faiss"):
        for modalities in (None, ["image"], ["audio", "text"]):
            ours = index.search(queries, top_k=8, modalities=modalities, backend=backend)
            theirs = direct.search(queries, top_k=8, modalities=modalities, backend=backend)
            assert [[h.id for h in hits] for hits in ours] == [[remaining[h.id] for h in hits] for hits in theirs]
            for our_hits, their_hits in zip(ours, theirs):
                assert [h.score for h in our_hits] == pytest.approx([h.score for h in their_hits], abs=1e-6)
                assert [h.row for h in our_hits] == [h.row for h in their_hits]
    assert index.add(model, processor, first.select([0])) == [ROWS]  # ids are never reused
    index.save(tmp_path / "index")
    assert EmbeddingIndex.load(tmp_path / "index").next_id == ROWS + 1


def test_exact_and_faiss_agree_on_a_20000_item_gallery():
    """FAISS here is an exact index (IndexFlatIP), so the threshold is 100% of queries: identical top-10 id sets."""
    generator = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(20_000, 256, generator=generator), dim=1)
    present = torch.rand(20_000, generator=generator) > 0.1  # some items lack the modality
    queries = torch.nn.functional.normalize(torch.randn(100, 256, generator=generator), dim=1)
    index = EmbeddingIndex.from_embeddings({"image": gallery, "audio": gallery.flip(0)}, present={"audio": present},
                                           ids=torch.arange(20_000) * 3)
    exact = index.search(queries, top_k=10, backend="exact")
    approximate = index.search(queries, top_k=10, backend="faiss")
    assert all(len(hits) == 10 for hits in exact)
    assert [{h.id for h in hits} for hits in approximate] == [{h.id for h in hits} for hits in exact]  # 100 of 100
    for exact_hits, faiss_hits in zip(exact, approximate):
        assert [h.score for h in faiss_hits] == pytest.approx([h.score for h in exact_hits], abs=1e-5)
    auto = index.search(queries[:1], top_k=10)  # one query on 20,000 items: auto takes FAISS
    assert 20_000 >= index_module.AUTO_FAISS_MIN_GALLERY and auto[0][0].id == exact[0][0].id
    assert index._faiss  # built by the searches above


def test_mm_index_builds_searches_adds_and_removes(contrastive_model_dir, items_dir, items, tmp_path, capsys):
    index_dir = tmp_path / "index"
    assert main(["build", "--model", str(contrastive_model_dir), "--data", str(items_dir / "first.csv"),
                 "--output", str(index_dir), "--batch_size", "8"]) == 0
    assert len(EmbeddingIndex.load(index_dir)) == FIRST
    capsys.readouterr()

    assert main(["search", "--index", str(index_dir), "--text", items[2]["text"], "--top_k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "modality", "id", "item"] and len(table) == 4
    assert [line.split()[0] for line in table[1:]] == ["1", "2", "3"]

    image = str(items_dir / items[4]["image"])
    assert main(["search", "--index", str(index_dir), "--image", image, "--modalities", "image", "--top_k", "2"]) == 0
    first_hit = capsys.readouterr().out.splitlines()[1].split()
    assert first_hit[1:] == ["1.0000", "image", "4", image]

    audio = str(items_dir / items[7]["audio"])
    assert main(["search", "--index", str(index_dir), "--audio", audio, "--modalities", "audio", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 5 and (hits[0]["rank"], hits[0]["id"], hits[0]["modality"]) == (1, 7, "audio")
    assert hits[0]["row"]["audio"] == audio and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)

    assert main(["add", "--index", str(index_dir), "--data", str(items_dir / "rest.csv")]) == 0
    assert main(["remove", "--index", str(index_dir), "--ids", "3", "7"]) == 0
    final = EmbeddingIndex.load(index_dir)
    assert final.ids.tolist() == [i for i in range(ROWS) if i not in (3, 7)]
    assert final.model_path == str(contrastive_model_dir)
    capsys.readouterr()

    assert main(["search", "--index", str(index_dir), "--text", "red", "--top_k", "0"]) == 2
    assert capsys.readouterr().err.strip() == "mm-index: error: top_k: 0 must be an integer >= 1"
    assert main(["remove", "--index", str(index_dir), "--ids", "3"]) == 2
    assert "mm-index: error: ids: [3] are not in the index" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path / "nowhere"), "--text", "red"]) == 2
    assert "mm-index: error: index:" in capsys.readouterr().err
    assert main(["build", "--model", str(tmp_path / "no-model"), "--data", str(items_dir / "first.csv"),
                 "--output", str(tmp_path / "other")]) == 2
    assert "mm-index: error: model:" in capsys.readouterr().err
    assert main(["search", "--index", str(index_dir)]) == 2  # argparse: one of --text/--image/--audio is required


def test_mm_index_reads_a_split_of_a_folder_and_leaves_out_a_column(contrastive_model_dir, items, tmp_path,
                                                                   capsys):
    datasets.DatasetDict(train=items.select(range(4)), test=items.select(range(4, 9))).save_to_disk(tmp_path / "data")
    command = ["build", "--model", str(contrastive_model_dir), "--data", str(tmp_path / "data"), "--audio_column",
               "none", "--output", str(tmp_path / "index")]
    assert main(command) == 2
    error = capsys.readouterr().err
    assert "mm-index: error: split: " in error and "choose one with --split" in error
    assert main([*command, "--split", "validation"]) == 2
    assert "split: 'validation' is not a split" in capsys.readouterr().err
    assert main([*command, "--split", "test"]) == 0
    index = EmbeddingIndex.load(tmp_path / "index")
    assert index.modalities == ("image", "text") and [row["text"] for row in index.rows] == items["text"][4:9]
    assert main(["search", "--index", str(tmp_path / "index"), "--text", items[6]["text"], "--modalities", "text",
                 "--backend", "exact", "--top_k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["row"]["text"] == items[6]["text"]
    assert main(["search", "--index", str(tmp_path / "index"), "--text", "red", "--modalities", "audio"]) == 2
    assert "modalities: ['audio'] not in the index (it holds image, text)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def image_text_model(vit_dir, bert_dir):
    """A joint embedding model without an audio tower (another config than the fixture's, same projection_dim)."""
    torch.manual_seed(0)
    model = MMFusionContrastiveModel.from_towers(vision=vit_dir, text=bert_dir, projection_dim=16,
                                                 **FUSION_KWARGS).eval()
    return model, MMFusionProcessor.from_towers(vision=vit_dir, text=bert_dir)


BAD_INPUTS = {
    "top_k zero": (lambda c: c.index.search(c.index.embeddings["text"][:1], top_k=0), "top_k: 0"),
    "top_k negative": (lambda c: c.index.query(c.model, c.processor, text="red", top_k=-1), "top_k: -1"),
    "empty text query": (lambda c: c.index.query(c.model, c.processor, text="  "), "text: the query is empty"),
    "no query": (lambda c: c.index.query(c.model, c.processor), r"query: give exactly one .*\(got none\)"),
    "two queries": (lambda c: c.index.query(c.model, c.processor, text="red", image=c.index.rows[0]["image"]),
                    r"query: .*\(got text, image\)"),
    "query dimension": (lambda c: c.index.search(torch.ones(1, 8)), r"query_embeds: shape \(1, 8\).*16"),
    "zero query": (lambda c: c.index.search(torch.zeros(2, 16)), "query_embeds: query 0 is a zero vector"),
    "unknown modality": (lambda c: c.index.search(torch.ones(1, 16), modalities=["smell"]), "modalities: 'smell'"),
    "unknown backend": (lambda c: c.index.search(torch.ones(1, 16), backend="annoy"), "backend: 'annoy'"),
    "unknown ids": (lambda c: c.index.remove([2, 999, 1000]), r"ids: \[999, 1000\] are not in the index"),
    "empty data": (lambda c: EmbeddingIndex.build(c.model, c.processor, c.items.select([])), "dataset: has no rows"),
    "rows without cells": (lambda c: EmbeddingIndex.build(c.model, c.processor, datasets.Dataset.from_dict(
        {"text": [None, ""]})), "dataset: none of its 2 rows"),
    "missing column": (lambda c: EmbeddingIndex.build(c.model, c.processor, c.items, columns={"text": "caption"}),
                       "columns: the text column 'caption' is not in the data set"),
    "add without a column": (lambda c: c.index.add(c.model, c.processor, c.items.remove_columns("audio")),
                             "columns: the audio column 'audio'"),
    "model of another config": (lambda c: c.index.query(*c.image_text_model, text="red"), "model: its config differs"),
    "model of another dim": (lambda c: EmbeddingIndex.from_embeddings({"text": torch.ones(3, 8)}).query(
        c.model, c.processor, text="red"), "model: its projection_dim 16 differs from the index's 8"),
    "modality the model lacks": (lambda c: EmbeddingIndex.from_embeddings({"text": torch.ones(3, 16)}).query(
        *c.image_text_model, audio=c.index.rows[0]["audio"]), "modality: this model has no audio tower"),
    "column of a modality the model lacks": (lambda c: EmbeddingIndex.build(
        *c.image_text_model, c.items, columns={"audio": "audio"}), "columns: the model has no audio tower"),
    "embeddings of mixed sizes": (lambda c: EmbeddingIndex.from_embeddings(
        {"text": torch.ones(3, 16), "image": torch.ones(4, 16)}), "embeddings: image has 4 rows for 3 ids"),
    "a DatasetDict": (lambda c: EmbeddingIndex.build(c.model, c.processor, datasets.DatasetDict(test=c.items)),
                      "dataset: a DatasetDict"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_field(case, built, items, model_and_processor, image_text_model):
    model, processor = model_and_processor
    context = SimpleNamespace(index=built, items=items, model=model, processor=processor,
                              image_text_model=image_text_model)
    call, message = BAD_INPUTS[case]
    length_before = len(built)
    with pytest.raises(ValueError, match=message):
        call(context)
    assert len(built) == length_before  # a refused change leaves the index as it was


def test_an_unfinished_or_foreign_folder_is_refused(built, tmp_path):
    built.save(tmp_path / "index")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tmp_path / "index", unfinished)
    (unfinished / INDEX_FILE).unlink()  # save writes it last: without it the save did not finish
    with pytest.raises(ValueError, match="not a complete mm-index folder: it has no index.json"):
        EmbeddingIndex.load(unfinished)
    (unfinished / INDEX_FILE).write_text((tmp_path / "index" / INDEX_FILE).read_text())
    (unfinished / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match="is inconsistent"):
        EmbeddingIndex.load(unfinished)
    with pytest.raises(ValueError, match="is not a folder"):
        EmbeddingIndex.load(tmp_path / "missing")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="folder: .* is not an mm-index folder; refusing to replace it"):
        built.save(tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_a_save_that_fails_midway_leaves_the_previous_index(built, tmp_path, monkeypatch):
    built.save(tmp_path / "index")
    smaller = EmbeddingIndex.load(tmp_path / "index")
    smaller.remove([0, 1])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(index_module, "_write_synced", crash)
    with pytest.raises(OSError, match="disk full"):
        smaller.save(tmp_path / "index")
    assert [p.name for p in tmp_path.iterdir()] == ["index"]  # the temporary folder is gone
    assert len(EmbeddingIndex.load(tmp_path / "index")) == ROWS  # the old index, whole
