"""mm-publish: the release folder loads where only transformers is installed and predicts like the original, the card
parses and validates, the upload sends exactly the allow-listed files and never the token, an adapter-only release
loads onto its base like the merged model, and forbidden files stay behind (Publishing acceptance 1-5); and the
`mm-fusion-classification` pipeline. A multi-task model and a joint embedding model publish too: their cards and
configs name their tasks and pipelines, and their cards' snippets run where only transformers is installed (the joint
embedding pipelines themselves are tested in test_pipelines.py)."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, pipeline

import training.publish as publish
from conftest import FUSION_KWARGS, IMAGE_SIZE, SAMPLING_RATE
from modeling_mm import MMFusionForSequenceClassification
from modeling_mm.pipeline_mm import PIPELINE_TASK
from processors import MMFusionProcessor
from training.lora import LoraSettings, apply_lora, load_trained_model, save_trained_model
from training.publish import ALLOWED_FILES, check_card, main
from conftest import PROJECT_PACKAGES, WITHOUT_PROJECT

FAKE_TOKEN = "hf_FAKEtoken1234567890"
CODE_FILES = {"configuration_mm.py", "modeling_mm.py", "processing_mm.py", "media.py", "pipeline_mm.py"}
# the tiny towers stand in for these Hub checkpoints (served from a fake offline Hub cache)
TOWER_IDS = {"vision": "mm-fusion-test/tiny-vit", "text": "mm-fusion-test/tiny-bert",
             "audio": "mm-fusion-test/tiny-wav2vec2"}
BASE_ID = "mm-fusion-test/tiny-base"  # an mm-fusion model the adapter could have been fine-tuned from
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


# How both sides predict on the sample's test split: the original model in this process, the release in the subprocess.
PREDICT = textwrap.dedent("""
    import csv, os
    import torch

    def read_rows(csv_path):
        folder = os.path.dirname(csv_path)
        with open(csv_path, newline="") as file:
            return [{"text": row["text"] or None,
                     "image": os.path.join(folder, row["image"]) if row["image"] else None,
                     "audio": os.path.join(folder, row["audio"]) if row["audio"] else None}
                    for row in csv.DictReader(file)]

    def predict(model, processor, rows, batch_size=60):
        logits = []
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                inputs = processor(text=[r["text"] for r in batch], images=[r["image"] for r in batch],
                                   audio=[r["audio"] for r in batch])
                logits.append(model(**inputs).logits)
        return torch.cat(logits).numpy()
""")


def run_without_project(parts: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run the script made of `parts` (each dedented on its own) in a fresh interpreter in `tmp_path`."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
                   "OMP_NUM_THREADS": "1", **env}
    environment.pop("PYTHONPATH", None)
    script = "\n".join(textwrap.dedent(part) for part in [WITHOUT_PROJECT, *parts])
    return subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=environment, capture_output=True,
                          text=True, timeout=300)


def answers_of_card_snippets(snippets: dict[str, list[str]], answer: str, tmp_path: Path, **env: str) -> dict:
    """Run each variant's card snippets in a fresh interpreter that cannot import the project (`env` added to its
    environment), check that the model they load is the repository's remote code, and return {variant: the value of
    the expression `answer` over the snippets' names `names`, under torch.no_grad}."""
    result = run_without_project([f"""
        import json, torch
        answers = {{}}
        for variant, snippets in {snippets!r}.items():
            names = {{}}
            for snippet in snippets:
                exec(snippet, names)
            model = names["model"]
            model = model.get_base_model() if hasattr(model, "get_base_model") else model
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            with torch.no_grad():
                answers[variant] = {answer}
        json.dump(answers, open("answers.json", "w"))
        print("OK")
    """], tmp_path, **env)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
    return json.loads((tmp_path / "answers.json").read_text())


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


# ---- fixtures: the sample model's release, and tiny merged/adapter models ------------------------------------------

# an mm-eval report.json, cut down to what the card reads
REPORT = {
    "model": {"modalities": ["image", "text", "audio"], "labels": ["match", "mismatch"]},
    "problem_type": "single_label_classification",
    "headline": {"accuracy": 0.9133, "macro_f1": 0.9021, "ece": 0.031, "brier": None},
    "data": {"source": "/data/private/test.csv", "split": "test", "rows": 300},
    "ablation": [{"modalities": ["image"], "accuracy": 0.5, "macro_f1": 0.49},
                 {"modalities": ["image", "text"], "accuracy": 0.8, "macro_f1": 0.79},
                 {"modalities": ["image", "text", "audio"], "accuracy": 0.9133, "macro_f1": 0.9021}],
    "fusion_gain": {"metric": "macro_f1", "all_modalities": ["image", "text", "audio"], "all_modalities_value": 0.9021,
                    "best_single_modality": "image", "best_single_modality_value": 0.49, "gain": 0.4121},
}


@pytest.fixture(scope="module")
def sample_release(sample_model_dir, tmp_path_factory) -> Path:
    """The sample model's release (dry run), with a hand-made report and small shards so that sharding is exercised."""
    root = tmp_path_factory.mktemp("sample_release")
    (root / "report.json").write_text(json.dumps(REPORT))
    code = main(["--model", str(sample_model_dir), "--repo-id", "mm-fusion/sample", "--dry-run", "--out",
                 str(root / "release"), "--report", str(root / "report.json"), "--max-shard-size", "40MB",
                 "--base-model", "text=sentence-transformers/all-MiniLM-L6-v2"])
    assert code == 0
    return root / "release"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, vit_dir, bert_dir, wav2vec2_dir) -> dict:
    """A tiny LoRA-trained model saved both ways (adapter folder, merged folder), and an offline Hub cache that
    serves its towers under TOWER_IDS."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = MMFusionForSequenceClassification.from_towers(
        vision=vit_dir, text=bert_dir, audio=wav2vec2_dir, num_labels=2, id2label={0: "match", 1: "mismatch"},
        label2id={"match": 0, "mismatch": 1}, **FUSION_KWARGS)
    model.save_pretrained(root / "base")  # the untrained base, as a published mm-fusion model would hold it
    peft_model = apply_lora(model, LoraSettings(vision_mode="lora", text_mode="lora", audio_mode="full"))
    with torch.no_grad():  # stands in for training: LoRA's B starts at zero, fusion and head at their init
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    processor = MMFusionProcessor.from_towers(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir)
    folders = {"adapter": save_trained_model(peft_model, root / "adapter", merge=False),
               "merged": save_trained_model(peft_model, root / "merged", merge=True)}
    for folder in folders.values():
        processor.save_pretrained(folder)
    cache = root / "hub"
    for repo_id, source in ((TOWER_IDS["vision"], vit_dir), (TOWER_IDS["text"], bert_dir),
                            (TOWER_IDS["audio"], wav2vec2_dir), (BASE_ID, root / "base")):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(source, repo / "snapshots" / FAKE_COMMIT)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(FAKE_COMMIT)
    return {**folders, "hub_cache": cache, "root": root}


@pytest.fixture(scope="module")
def tiny_inputs() -> dict:
    """Raw inputs with missing modalities: sample 1 has no image, sample 2 only an image, sample 3 only text."""
    rng = np.random.default_rng(0)
    texts = ["a red circle with a high tone", "the square is blue", None, "a blue star"]
    images = [rng.integers(0, 256, (IMAGE_SIZE + 8, IMAGE_SIZE, 3), dtype=np.uint8) for _ in range(4)]
    audio = [rng.standard_normal(3000 + 500 * i).astype(np.float32) * 0.1 for i in range(4)]
    images[1] = images[3] = audio[2] = audio[3] = None
    return {"text": texts, "images": images, "audio": audio}


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi replaced at publish's call boundary by a recorder that keeps every byte it would upload."""
    hub = SimpleNamespace(calls=[], uploads={}, existing_public_repo=False)
    calls, uploads = hub.calls, hub.uploads

    class FakeHfApi:
        def __init__(self, token=None, **kwargs):
            calls.append(("HfApi", {"token": token, **kwargs}))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

        def repo_info(self, repo_id, **kwargs):
            calls.append(("repo_info", {"repo_id": repo_id, **kwargs}))
            return SimpleNamespace(private=not hub.existing_public_repo)

        def create_branch(self, repo_id, **kwargs):
            calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

        def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
            calls.append(("upload_folder", {"repo_id": repo_id, "allow_patterns": allow_patterns, **kwargs}))
            folder = Path(folder_path)
            paths = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
            for name in filter_repo_objects(paths, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
                uploads[name] = (folder / name).read_bytes()
            return SimpleNamespace(oid=FAKE_COMMIT)

        def create_commit(self, repo_id, operations, **kwargs):
            calls.append(("create_commit", {"repo_id": repo_id, **kwargs}))
            for operation in operations:
                uploads[operation.path_in_repo] = operation.path_or_fileobj

    monkeypatch.setattr(publish, "HfApi", FakeHfApi)
    return hub


# ---- 1. the release loads where only transformers is installed, and predicts like the original ---------------------

def test_release_loads_without_the_project_and_predicts_like_the_original(sample_release, sample_model_dir,
                                                                          sample_dir, tmp_path):
    files = {p.name for p in sample_release.iterdir()}
    assert CODE_FILES <= files and "model.safetensors.index.json" in files and "model.safetensors" not in files
    # saving again changed no weight
    original, released = (
        {key: value for shard in folder.glob("model*.safetensors") for key, value in load_file(shard).items()}
        for folder in (sample_model_dir, sample_release))
    assert original.keys() == released.keys()
    assert all(torch.equal(original[key], released[key]) for key in original)

    namespace: dict = {}
    exec(PREDICT, namespace)
    rows = namespace["read_rows"](str(sample_dir / "test.csv"))
    model = load_trained_model(sample_model_dir)
    expected = namespace["predict"](model, AutoProcessor.from_pretrained(sample_model_dir), rows)

    result = run_without_project([PREDICT, f"""
        import json
        import numpy as np
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoProcessor, pipeline
        folder = {str(sample_release)!r}
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        classifier = pipeline("{PIPELINE_TASK}", model=folder, trust_remote_code=True)
        for loaded in (config, model, processor, classifier):
            assert type(loaded).__module__.startswith("transformers_modules."), type(loaded).__module__
        rows = read_rows({str(sample_dir / "test.csv")!r})
        np.save("logits.npy", predict(model, processor, rows))
        samples = [{{k: v for k, v in row.items() if v is not None}} for row in rows]
        with open("pipeline.json", "w") as file:
            json.dump(classifier(samples, batch_size=60, top_k=None), file)
        loaded = [name for name in sys.modules if name.split(".")[0] in {PROJECT_PACKAGES!r}]
        assert not loaded, loaded
        print("OK")
    """], tmp_path)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]

    logits = np.load(tmp_path / "logits.npy")
    assert logits.shape == expected.shape == (len(rows), 2)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    assert (logits.argmax(1) == expected.argmax(1)).all()
    probabilities = torch.softmax(torch.from_numpy(expected), -1).numpy()
    id2label = model.config.id2label
    for row, ranked in enumerate(json.loads((tmp_path / "pipeline.json").read_text())):
        assert ranked[0]["label"] == id2label[int(expected[row].argmax())]
        assert {r["label"]: r["score"] for r in ranked} == pytest.approx(
            {id2label[i]: float(p) for i, p in enumerate(probabilities[row])}, abs=1e-5)


def test_release_code_imports_only_torch_numpy_pil_and_transformers(sample_release):
    """DESIGN.md: the flat files import nothing else at import time, and their relative imports are in the release."""
    allowed = {"torch", "numpy", "PIL", "transformers", *sys.stdlib_module_names}
    for name in CODE_FILES:
        for node in ast.parse((sample_release / name).read_text()).body:
            if isinstance(node, ast.Import):
                assert {alias.name.split(".")[0] for alias in node.names} <= allowed, (name, ast.dump(node))
            elif isinstance(node, ast.ImportFrom) and node.level:
                assert (sample_release / f"{node.module}.py").is_file(), (name, node.module)
            elif isinstance(node, ast.ImportFrom):
                assert node.module.split(".")[0] in allowed, (name, node.module)


# ---- 2. the card parses, validates and holds the evaluation ----------------------------------------------------------

def test_card_parses_validates_and_holds_the_evaluation(sample_release, sample_model_dir):
    card = ModelCard.load(sample_release / "README.md")
    check_card(card)
    data = card.data
    assert data.library_name == "transformers" and data.license == "apache-2.0"
    assert data.pipeline_tag == "text-classification"  # the Hub has no multimodal-classification tag
    assert data.base_model == ["sentence-transformers/all-MiniLM-L6-v2"]  # the sample's other towers are local
    assert {"mm-fusion", "multimodal", "image", "text", "audio"} <= set(data.tags)
    results = {(r.metric_type, r.dataset_split): r.metric_value for r in data.eval_results}
    assert results == {("accuracy", "test"): 0.9133, ("f1", "test"): 0.9021}

    body = card.text
    assert 'revision="main"' in body and 'pipeline("mm-fusion-classification"' in body
    assert "## Training" in body and "| towers |" in body and "| learning rate |" in body
    assert "| image + text + audio | 0.9133 | 0.9021 |" in body and "### Modality ablation" in body
    assert "| ece | 0.0310 |" in body and "brier" not in body  # every headline number, no empty ones
    assert "vs the best single modality (image) 0.4900: +0.4121" in body
    assert "local data (`test.csv`)" in body  # a local source is named by its file name only
    for path in sample_release.glob("*.json"):  # and no local path travels in the metadata files
        text = path.read_text()
        assert str(sample_model_dir) not in text and "site-packages" not in text, path.name


@pytest.mark.parametrize("changes, message", [
    ({"base_model": ["not//an id"]}, r"card: base_model\[0\]"),
    ({"library_name": "pytorch"}, "card: library_name"),
    ({"license": "Apache 2"}, "card: license"),
    ({"model-index": [{"name": "x", "results": [{"task": {"type": "other"}, "dataset": {"name": "d", "type": "d"},
                                                 "metrics": [{"type": "accuracy", "value": "high"}]}]}]},
     "card: model-index result 0"),
])
def test_card_check_refuses_bad_metadata(sample_release, changes, message):
    card = ModelCard.load(sample_release / "README.md")
    metadata = {**card.data.to_dict(), **changes}
    with pytest.raises(ValueError, match=message):
        check_card(ModelCard("---\n" + yaml.safe_dump(metadata) + "---\n" + card.text))


# ---- 3. the upload sends exactly the allow-list and never the token ------------------------------------------------

TINY_RELEASE = {"README.md", "config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
                "tokenizer_config.json", *CODE_FILES}


def test_upload_sends_exactly_the_allow_list_and_never_the_token(tiny, fake_hub, monkeypatch, capsys, caplog):
    calls, uploads = fake_hub.calls, fake_hub.uploads
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    caplog.set_level("DEBUG")
    assert main(["--model", str(tiny["merged"]), "--repo-id", "mm-fusion/tiny", "--private", "--revision", "v1"]) == 0

    names = [name for name, _ in calls]
    assert names == ["HfApi", "create_repo", "repo_info", "create_branch", "upload_folder", "create_commit"]
    arguments = dict(calls)
    assert arguments["HfApi"]["token"] == FAKE_TOKEN  # handed to huggingface_hub, and nowhere else
    assert arguments["create_repo"]["repo_id"] == "mm-fusion/tiny" and arguments["create_repo"]["private"] is True
    assert arguments["create_branch"]["branch"] == "v1"
    assert arguments["upload_folder"]["revision"] == arguments["create_commit"]["revision"] == "v1"
    assert set(uploads) == TINY_RELEASE
    assert all(any(fnmatch(name, pattern) for pattern in ALLOWED_FILES) for name in uploads)
    # the card's snippets are pinned to the commit that holds the weights
    assert f'revision="{FAKE_COMMIT}"' in uploads["README.md"].decode()

    captured = capsys.readouterr()
    for name, content in uploads.items():
        assert FAKE_TOKEN.encode() not in content, name
    assert FAKE_TOKEN not in captured.out and FAKE_TOKEN not in captured.err
    assert FAKE_TOKEN not in caplog.text
    assert all(FAKE_TOKEN not in record.getMessage() for record in caplog.records)
    assert f"commit {FAKE_COMMIT}" in captured.out


def test_upload_without_a_token_is_refused(tiny, fake_hub, monkeypatch, capsys):
    calls = fake_hub.calls
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(publish, "get_token", lambda: None)
    assert main(["--model", str(tiny["merged"]), "--repo-id", "mm-fusion/tiny"]) == 2
    assert "mm-publish: error: token:" in capsys.readouterr().err and not calls


def test_private_upload_refuses_an_existing_public_repo(tiny, fake_hub, monkeypatch, capsys):
    fake_hub.existing_public_repo = True
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert main(["--model", str(tiny["merged"]), "--repo-id", "mm-fusion/tiny", "--private"]) == 2
    assert "private: mm-fusion/tiny already exists and is public" in capsys.readouterr().err
    assert not fake_hub.uploads


def test_dry_run_prints_files_sizes_and_card_and_uploads_nothing(tiny, fake_hub, capsys):
    calls, uploads = fake_hub.calls, fake_hub.uploads
    assert main(["--model", str(tiny["merged"]), "--repo-id", "mm-fusion/tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not calls and not uploads
    for name in TINY_RELEASE:
        assert re.search(rf"^  {re.escape(name)} +\d+(\.\d)? (B|kB|MB)$", out, flags=re.M), name
    assert "README.md:\n---\n" in out and "library_name: transformers" in out
    assert "Not evaluated" in out  # no report for this model
    assert "dry run: nothing uploaded" in out


# ---- 4. adapter-only: loads onto the base and predicts like the merged model ---------------------------------------

def test_adapter_only_release_loads_onto_the_base_like_the_merged_model(tiny, tiny_inputs, tmp_path):
    """Two releases of one adapter: the base rebuilt from the towers' Hub ids, or a published mm-fusion model."""
    variants = {"towers": TOWER_IDS, "model": {"model": BASE_ID}}
    snippets = {}
    for variant, bases in variants.items():
        release = tmp_path / variant
        assert main(["--model", str(tiny["adapter"]), "--repo-id", "mm-fusion/tiny-lora", "--adapter-only",
                     "--dry-run", "--out", str(release),
                     *[f"--base-model={key}={repo_id}" for key, repo_id in bases.items()]]) == 0
        files = {p.name for p in release.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "config.json", *CODE_FILES} <= files
        assert not any(name.startswith("model") and name.endswith(".safetensors") for name in files)
        adapter_base = json.loads((release / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert adapter_base == bases.get("model")
        card = ModelCard.load(release / "README.md")
        check_card(card)
        assert card.data.base_model == list(bases.values()) and card.data.base_model_relation == "adapter"
        assert card.data.library_name == "peft"
        # the card's own loading snippet, pointed at the local folder
        snippet = python_blocks(card.text)[0]
        snippet = re.sub(r'^repo_id = ".*"$', f"repo_id = {str(release)!r}", snippet, flags=re.M)
        snippets[variant] = re.sub(r'^revision = ".*"$', "revision = None", snippet, flags=re.M)

    merged = load_trained_model(tiny["merged"])
    processor = AutoProcessor.from_pretrained(tiny["merged"])
    with torch.no_grad():
        expected = merged(**processor(**tiny_inputs, sampling_rate=SAMPLING_RATE)).logits.numpy()
    np.savez(tmp_path / "inputs.npz", **{f"{key}{i}": value for key in ("images", "audio")
                                         for i, value in enumerate(tiny_inputs[key]) if value is not None})
    (tmp_path / "texts.json").write_text(json.dumps(tiny_inputs["text"]))

    # each snippet runs with only transformers + peft; the Hub ids resolve in an offline Hub cache
    result = run_without_project([f"""
        import json
        import numpy as np
        import torch
        arrays = np.load("inputs.npz")
        texts = json.load(open("texts.json"))
        images, audio = ([arrays[f"{{key}}{{i}}"] if f"{{key}}{{i}}" in arrays.files else None for i in range(4)]
                         for key in ("images", "audio"))
        for variant, snippet in {snippets!r}.items():
            names = {{}}
            exec(snippet, names)
            model, processor = names["model"], names["processor"]
            assert type(model.base_model.model).__module__.startswith("transformers_modules."), variant
            with torch.no_grad():
                inputs = processor(text=texts, images=images, audio=audio, sampling_rate={SAMPLING_RATE})
                np.save(f"logits_{{variant}}.npy", model(**inputs).logits.numpy())
        print("OK")
    """], tmp_path, HF_HUB_CACHE=str(tiny["hub_cache"]))
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
    for variant in variants:
        np.testing.assert_allclose(np.load(tmp_path / f"logits_{variant}.npy"), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("folder, message", [
    ("adapter", "--base-model vision=ORG/NAME"),  # its towers are local folders, which others cannot download
    ("merged", "adapter_only: .* holds a merged model"),
])
def test_adapter_only_refuses_what_others_could_not_load(tiny, capsys, folder, message):
    assert main(["--model", str(tiny[folder]), "--repo-id", "mm-fusion/x", "--adapter-only", "--dry-run"]) == 2
    assert re.search(message, capsys.readouterr().err)


# ---- 5. forbidden files in the model folder stay behind, and the command says so --------------------------------

def test_forbidden_files_are_left_out_and_reported(tiny, fake_hub, monkeypatch, tmp_path, capsys):
    calls, uploads = fake_hub.calls, fake_hub.uploads
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    model_dir = shutil.copytree(tiny["merged"], tmp_path / "model")
    junk = {"optimizer.pt": "optimizer state", "rng_state.pkl": "RNG state", "scheduler.pt": "scheduler state",
            "training_args.bin": "pickled training arguments", "extra.pkl": "pickle",
            "events.out.tfevents.1.host": "TensorBoard log", "checkpoint-5/": "training checkpoint",
            "logs/": "logs", "notes.txt": "not on the allow-list"}
    for name in junk:
        path = model_dir / name.rstrip("/")
        if name.endswith("/"):
            path.mkdir()
            (path / "model.safetensors").write_bytes(b"checkpoint weights")
        else:
            path.write_bytes(b"\x80\x04 pickled state")
    assert main(["--model", str(model_dir), "--repo-id", "mm-fusion/tiny"]) == 0
    assert set(uploads) == TINY_RELEASE
    out = capsys.readouterr().out
    assert "left out of the model folder" in out
    for name, reason in junk.items():
        assert re.search(rf"^  {re.escape(name)}  \(.*{re.escape(reason.split()[0])}", out, flags=re.M), name


# ---- the pipeline ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier(tiny):
    model = load_trained_model(tiny["merged"])
    return pipeline(PIPELINE_TASK, model=model, processor=AutoProcessor.from_pretrained(tiny["merged"]))


def test_pipeline_takes_any_subset_as_paths_pil_and_arrays(classifier, tmp_path):
    image_path, audio_path = tmp_path / "image.png", tmp_path / "audio.wav"
    Image.new("RGB", (40, 30), "red").save(image_path)
    soundfile.write(audio_path, np.sin(np.arange(8000) / 10).astype(np.float32) * 0.3, 8000)
    cases = [
        dict(text="a red circle"),
        dict(image=Image.new("RGB", (40, 30), "blue")),
        dict(audio=np.zeros(4000, np.float32) + 0.1, sampling_rate=SAMPLING_RATE),
        dict(image=str(image_path), audio=str(audio_path)),
        dict(text="a red circle", image=np.zeros((30, 40, 3), np.uint8), audio=(8000, np.ones(8000, np.float32) * .1)),
    ]
    for case in cases:
        result = classifier(**case)
        assert [r["label"] for r in result] in (["match", "mismatch"], ["mismatch", "match"]), case
        assert result[0]["score"] >= result[1]["score"] and sum(r["score"] for r in result) == pytest.approx(1.0)
    assert len(classifier(text="a red circle", top_k=1)) == 1
    assert classifier({"text": "a red circle"}) == classifier(text="a red circle")


def test_pipeline_batches_give_the_single_sample_results(classifier):
    samples = [{"text": "a red circle"}, {"image": Image.new("RGB", (40, 30), "blue")},
               {"text": "the square is blue", "audio": np.zeros(4000, np.float32) + 0.1, "sampling_rate": 16000},
               {"text": "a green star", "image": Image.new("RGB", (40, 30), "green")}]
    one_by_one = [classifier(sample) for sample in samples]
    for batched in (classifier(samples, batch_size=3), classifier(samples)):
        assert len(batched) == len(samples)
        for single, batch in zip(one_by_one, batched):
            assert [r["label"] for r in single] == [r["label"] for r in batch]
            assert [r["score"] for r in single] == pytest.approx([r["score"] for r in batch], abs=1e-5)
    keyword = classifier(text=["a red circle", "a blue square"], image=[None, Image.new("RGB", (40, 30), "blue")])
    assert len(keyword) == 2 and keyword[0] == one_by_one[0]


@pytest.mark.parametrize("call, message", [
    (dict(), "text, image, audio: give at least one"),
    (dict(inputs={"video": "x.mp4"}), r"inputs\[0\]: unknown keys \['video'\]"),
    (dict(inputs=[{"text": "a"}, {}]), r"inputs\[1\]: the sample has no text, image or audio"),
    (dict(text=["a", "b"], image=[None]), "lists of one length"),
    (dict(text="a", top_k=0), "top_k: expected a positive int"),
    (dict(text="a", colour="red"), "colour: not a parameter"),
])
def test_pipeline_refuses_bad_input_naming_the_argument(classifier, call, message):
    with pytest.raises(ValueError, match=message):
        classifier(**call)


# ---- a multi-task model: its pipeline, its release and its card ----------------------------------------------------

MULTI_TASKS = [
    {"name": "sentiment", "problem_type": "single_label_classification", "labels": ["negative", "positive", "neutral"]},
    {"name": "topics", "problem_type": "multi_label_classification", "labels": ["sports", "music", "art", "food"]},
    {"name": "intensity", "problem_type": "regression", "target_mean": 5.0, "target_std": 2.0},
]
# a hand-written mm-eval report of a multi-task model, cut down to what the card reads: per task its section
MULTI_TASK_REPORT = {
    "model": {"modalities": ["image", "text"]},
    "data": {"source": "/data/private/test.csv", "split": "test", "rows": 200},
    "tasks": {
        "sentiment": {"problem_type": "single_label_classification",
                      "headline": {"accuracy": 0.81, "macro_f1": 0.79, "balanced_accuracy": 0.8},
                      "ablation": [{"modalities": ["image"], "accuracy": 0.6},
                                   {"modalities": ["text"], "accuracy": 0.7},
                                   {"modalities": ["image", "text"], "accuracy": 0.81}]},
        "topics": {"problem_type": "multi_label_classification",
                   "headline": {"accuracy": 0.42, "micro_f1": 0.71, "macro_f1": 0.66, "hamming_loss": 0.12},
                   "metrics": {"thresholds": {"sports": 0.4, "music": 0.55, "art": 0.5, "food": 0.35}}},
        "intensity": {"problem_type": "regression",
                      "headline": {"mae": 0.91, "rmse": 1.2, "r2": 0.55, "pearson": 0.75, "spearman": None},
                      "metrics": {"mae": 0.91, "rmse": 1.2, "r2": 0.55, "pearson": 0.75, "spearman": None,
                                  "mse": 1.44}},
    },
}
# what the model-index holds: (metric name, metric type, value), one per task and headline metric with a value
MULTI_TASK_RESULTS = {
    ("sentiment/accuracy", "accuracy", 0.81), ("sentiment/macro_f1", "f1", 0.79),
    ("sentiment/balanced_accuracy", "balanced_accuracy", 0.8),
    ("topics/accuracy", "accuracy", 0.42), ("topics/micro_f1", "f1", 0.71), ("topics/macro_f1", "f1", 0.66),
    ("topics/hamming_loss", "hamming_loss", 0.12),
    ("intensity/mae", "mae", 0.91), ("intensity/rmse", "rmse", 1.2), ("intensity/r2", "r_squared", 0.55),
    ("intensity/pearson", "pearsonr", 0.75),
}
MULTI_TASK_TEXT = "a red circle"


@pytest.fixture(scope="module")
def multi_task(tmp_path_factory, vit_dir, bert_dir) -> dict:
    """A tiny image + text MMFusionForMultiTask saved with its processor (heads scaled so that its answers are not
    all at the prior), its release (dry run) with MULTI_TASK_REPORT, and an image to send."""
    from modeling_mm import MMFusionForMultiTask

    root = tmp_path_factory.mktemp("multi_task")
    torch.manual_seed(0)
    model = MMFusionForMultiTask.from_towers(vision=vit_dir, text=bert_dir, tasks=MULTI_TASKS, **FUSION_KWARGS)
    with torch.no_grad():
        for head in model.heads.values():
            head.weight.mul_(20.0)
    model.save_pretrained(root / "model")
    MMFusionProcessor.from_towers(vision=vit_dir, text=bert_dir).save_pretrained(root / "model")
    (root / "report.json").write_text(json.dumps(MULTI_TASK_REPORT))
    assert main(["--model", str(root / "model"), "--repo-id", "mm-fusion/multi", "--dry-run", "--out",
                 str(root / "release"), "--report", str(root / "report.json")]) == 0
    image = root / "image.png"
    Image.new("RGB", (40, 30), "red").save(image)
    return {"model": root / "model", "release": root / "release", "image": image}


def own_answers(folder: Path, texts: list, images: list) -> list[dict]:
    """Each task's answer as a user reads it from the model's logits: ranked softmax, the labels with a sigmoid of at
    least 0.5 (most probable first) and every label's, the regression output."""
    from modeling_mm import MMFusionForMultiTask

    model = MMFusionForMultiTask.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**AutoProcessor.from_pretrained(folder)(text=texts, images=images)).logits
    answers = []
    for i in range(len(texts)):
        sentiment = logits["sentiment"][i].softmax(-1).tolist()
        topics = logits["topics"][i].sigmoid().tolist()
        ranked = sorted(range(3), key=lambda k: -sentiment[k])
        labels = MULTI_TASKS[1]["labels"]
        answers.append({
            "sentiment": [{"label": MULTI_TASKS[0]["labels"][k], "score": sentiment[k]} for k in ranked],
            "topics": {"labels": [labels[k] for k in sorted(range(4), key=lambda k: -topics[k]) if topics[k] >= 0.5],
                       "scores": dict(zip(labels, topics))},
            "intensity": float(logits["intensity"][i, 0]),
        })
    return answers


def assert_same_answers(given: dict, expected: dict) -> None:
    assert list(given) == ["sentiment", "topics", "intensity"]
    assert [r["label"] for r in given["sentiment"]] == [r["label"] for r in expected["sentiment"]]
    assert [r["score"] for r in given["sentiment"]] == pytest.approx([r["score"] for r in expected["sentiment"]],
                                                                      abs=1e-5)
    assert given["topics"]["labels"] == expected["topics"]["labels"]
    assert given["topics"]["scores"] == pytest.approx(expected["topics"]["scores"], abs=1e-5)
    assert given["intensity"] == pytest.approx(expected["intensity"], abs=1e-4)


@pytest.fixture(scope="module")
def multi_task_pipeline(multi_task):
    from modeling_mm import MMFusionForMultiTask

    model = MMFusionForMultiTask.from_pretrained(multi_task["model"]).eval()
    return pipeline(PIPELINE_TASK, model=model, processor=AutoProcessor.from_pretrained(multi_task["model"]))


def test_multi_task_pipeline_answers_every_task_under_its_name(multi_task, multi_task_pipeline):
    texts, images = [MULTI_TASK_TEXT, "a blue square", None], [str(multi_task["image"]), None, str(multi_task["image"])]
    expected = own_answers(multi_task["model"], texts, images)
    samples = [{key: value for key, value in (("text", t), ("image", i)) if value} for t, i in zip(texts, images)]
    batched = multi_task_pipeline(samples, batch_size=2)
    assert len(batched) == 3
    for sample, answer, own in zip(samples, batched, expected):
        assert_same_answers(answer, own)
        assert_same_answers(multi_task_pipeline(sample), own)
    # the multi-label answers are not all alike: the model gives some tags and not others
    assert any(0 < len(own["topics"]["labels"]) < 4 for own in expected)
    top = multi_task_pipeline(samples[0], top_k=1)
    assert len(top["sentiment"]) == 1 and top["sentiment"][0]["label"] == expected[0]["sentiment"][0]["label"]
    assert top["topics"] == multi_task_pipeline(samples[0])["topics"]  # top_k is for single-label tasks
    with pytest.raises(ValueError, match="function_to_apply: a multi-task model scores each task by its own"):
        multi_task_pipeline(samples[0], function_to_apply="softmax")


def test_multi_task_pipeline_reads_thresholds_the_config_carries(multi_task, multi_task_pipeline, monkeypatch):
    from modeling_mm.pipeline_mm import task_thresholds

    topics = multi_task_pipeline.model.config.tasks[1]
    scores = multi_task_pipeline(text=MULTI_TASK_TEXT)["topics"]["scores"]
    # each label given exactly where its own threshold says so: "sports" always, "music" never, the rest at 0.5
    monkeypatch.setitem(topics, "thresholds", {"sports": 0.0, "music": 1.0})
    given = multi_task_pipeline(text=MULTI_TASK_TEXT)["topics"]["labels"]
    assert "sports" in given and "music" not in given
    assert {"art", "food"} & set(given) == {label for label in ("art", "food") if scores[label] >= 0.5}
    assert task_thresholds(topics).tolist() == [0.0, 1.0, 0.5, 0.5]
    monkeypatch.setitem(topics, "thresholds", [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"tasks.topics.thresholds: 3 values for 4 labels"):
        task_thresholds(topics)


def test_multi_task_card_names_the_tasks_and_has_a_result_per_task_and_metric(multi_task):
    release = multi_task["release"]
    card = ModelCard.load(release / "README.md")
    check_card(card)
    data = card.data
    assert data.pipeline_tag == "text-classification" and "multi-task" in data.tags
    assert {(r.metric_name, r.metric_type, r.metric_value) for r in data.eval_results} == MULTI_TASK_RESULTS
    assert {(r.dataset_split, r.dataset_name) for r in data.eval_results} == {("test", "test.csv")}

    body = card.text
    assert ("one head per task, 3 tasks: `sentiment` (single-label classification over 3 labels: `negative`, "
            "`positive`, `neutral`); `topics` (multi-label classification over 4 labels: `sports`, `music`, `art`, "
            "`food`); `intensity` (regression, one output, in the targets' units)") in body
    assert "classification head over" not in body
    usage = python_blocks(body)
    assert "'sentiment': [{'label': 'negative', 'score': ...}, ...]" in usage[0]
    assert "'topics': {'labels': [...], 'scores': {'sports': ..., ...}}" in usage[0] and "'intensity': ..." in usage[0]
    assert 'answers["intensity"] = logits["intensity"][:, 0].tolist()' in usage[1]
    assert "### sentiment (single-label classification)" in body and "| balanced_accuracy | 0.8000 |" in body
    assert "#### Modality ablation" in body and "| image + text | 0.8100 |" in body
    assert "### topics (multi-label classification)" in body and "| hamming_loss | 0.1200 |" in body
    assert "`sports` 0.4000, `music` 0.5500, `art` 0.5000, `food` 0.3500" in body
    assert "### intensity (regression)" in body and "| rmse | 1.2000 |" in body
    assert "| mse |" not in body and "spearman" not in body  # the headline's numbers, no empty ones

    config = json.loads((release / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_mm.MMFusionForMultiTask"
    assert "AutoModelForSequenceClassification" not in config["auto_map"]
    assert config["custom_pipelines"][PIPELINE_TASK]["pt"] == ["AutoModel"]
    assert [task["name"] for task in config["tasks"]] == ["sentiment", "topics", "intensity"]


def test_multi_task_release_runs_its_card_snippets_where_only_transformers_is_installed(multi_task, tmp_path):
    """The card's two snippets, pointed at the release folder, run in a fresh interpreter that cannot import the
    project: the pipeline (through trust_remote_code) and the step-by-step reading of the logits give the
    model's own answers for every task."""
    release = multi_task["release"]
    shutil.copy(multi_task["image"], tmp_path / "image.png")
    snippets = [re.sub(r'revision="[^"]*"', "revision=None", block.replace('"mm-fusion/multi"', repr(str(release))))
                for block in python_blocks(ModelCard.load(release / "README.md").text)]
    result = run_without_project([f"""
        import json
        names = {{}}
        for snippet in {snippets!r}:
            exec(snippet, names)
        for loaded in (names["predictor"].model, names["model"]):
            assert type(loaded).__module__.startswith("transformers_modules."), type(loaded).__module__
            assert type(loaded).__name__ == "MMFusionForMultiTask", type(loaded).__name__
        with open("answers.json", "w") as file:
            json.dump({{"pipeline": names["predictor"](image="image.png", text="a caption"),
                       "step_by_step": names["answers"]}}, file)
        loaded = [name for name in sys.modules if name.split(".")[0] in {PROJECT_PACKAGES!r}]
        assert not loaded, loaded
        print("OK")
    """], tmp_path)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]

    answers = json.loads((tmp_path / "answers.json").read_text())
    (expected,) = own_answers(multi_task["model"], ["a caption"], [str(multi_task["image"])])
    assert_same_answers(answers["pipeline"], expected)
    step = answers["step_by_step"]
    assert step["sentiment"] == [expected["sentiment"][0]["label"]]
    assert sorted(step["topics"][0]) == sorted(expected["topics"]["labels"])
    assert step["intensity"] == pytest.approx([expected["intensity"]], abs=1e-4)


def test_a_multi_task_model_is_not_published_as_an_adapter(multi_task, capsys):
    assert main(["--model", str(multi_task["model"]), "--repo-id", "mm-fusion/x", "--adapter-only", "--dry-run"]) == 2
    assert "adapter_only:" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda r: r["tasks"]["topics"].pop("problem_type"), r"tasks\.topics\.problem_type is missing"),
    (lambda r: r["tasks"]["intensity"].pop("headline"), r"tasks\.intensity\.headline .* holds no metric values"),
    (lambda r: r["tasks"].clear(), "tasks in .* must map each task name"),
])
def test_a_multi_task_report_without_what_the_card_reads_is_refused(tmp_path, change, message):
    report = json.loads(json.dumps(MULTI_TASK_REPORT))
    change(report)
    (tmp_path / "report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match=message):
        publish.read_report(tmp_path / "report.json")


# ---- a joint embedding model: its release, its card and its pipelines through trust_remote_code --------------------

JOINT_LABELS = ["a red circle", "a blue square"]  # the labels the card's snippets use
# an mm-eval report of a joint embedding model ("problem_type": "contrastive"), cut down to what the card reads:
# retrieval and zero-shot sections, a headline of their main numbers, no classifier section
JOINT_REPORT = {
    "problem_type": "contrastive",
    "model": {"modalities": ["image", "text", "audio"], "projection_dim": 16},
    "data": {"source": "/data/private/test.csv", "split": "test", "rows": 120},
    "headline": {"image->text r@1": 0.62, "text->image r@1": 0.58, "zero-shot shape (image) accuracy": 0.71},
    "retrieval": {"positives": "the row's own item", "pairs": {
        "image->text": {"metrics": {"r@1": 0.62, "r@5": 0.93, "r@10": 0.97, "median_rank": 1, "mean_rank": 1.8,
                                    "map": 0.74}},
        "text->image": {"metrics": {"r@1": 0.58, "r@5": 0.9, "r@10": 0.96, "median_rank": 1, "mean_rank": 2.1,
                                    "map": 0.7}}}},
    "zero_shot": {"prompt_template": "a photo of {}", "columns": {"shape": {
        "classes": ["circle", "square"], "modalities": {"image": {"accuracy": 0.71, "macro_f1": 0.69}}}}},
}


def joint_results(report: dict) -> set:
    """The model-index training.report gives a joint embedding report, which the card must hold: (metric type, name,
    value, split) per result. (The Hub's model-index groups results by task type and data set, so a card read back
    keeps one task name per group.)"""
    from training.report import model_index_results

    return {(r.metric_type, r.metric_name, r.metric_value, r.dataset_split)
            for r in model_index_results(report, dataset_name="test.csv", dataset_type="local")}


def card_results(card: ModelCard) -> set:
    return {(r.metric_type, r.metric_name, r.metric_value, r.dataset_split) for r in card.data.eval_results or []}


def write_media(folder: Path) -> None:
    """The files the card's snippets name: image.png and audio.wav."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / "image.png")
    soundfile.write(folder / "audio.wav", (rng.standard_normal(5000) * 0.1).astype(np.float32), SAMPLING_RATE,
                    subtype="FLOAT")


def card_snippets(release: Path, repo_id: str) -> list[str]:
    """The card's python blocks pointed at the local release folder, unpinned."""
    blocks = python_blocks(ModelCard.load(release / "README.md").text)
    blocks = [re.sub(r'^repo_id = ".*"$', f"repo_id = {str(release)!r}", block, flags=re.M) for block in blocks]
    blocks = [re.sub(r'^revision = ".*"$', "revision = None", block, flags=re.M) for block in blocks]
    return [re.sub(r'revision="[^"]*"', "revision=None", block.replace(f'"{repo_id}"', repr(str(release))))
            for block in blocks]


@pytest.fixture(scope="module")
def joint_release(contrastive_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("joint")
    (root / "report.json").write_text(json.dumps(JOINT_REPORT))
    assert main(["--model", str(contrastive_model_dir), "--repo-id", "mm-fusion/joint", "--dry-run", "--out",
                 str(root / "release"), "--report", str(root / "report.json")]) == 0
    return root / "release"


def test_joint_embedding_dry_run_lists_the_allow_listed_release(contrastive_model_dir, fake_hub, capsys, tmp_path):
    assert main(["--model", str(contrastive_model_dir), "--repo-id", "mm-fusion/joint", "--dry-run", "--out",
                 str(tmp_path / "release")]) == 0
    out = capsys.readouterr().out
    assert not fake_hub.calls and not fake_hub.uploads
    assert {p.name for p in (tmp_path / "release").iterdir()} == TINY_RELEASE
    for name in TINY_RELEASE:
        assert re.search(rf"^  {re.escape(name)} +\d+(\.\d)? (B|kB|MB)$", out, flags=re.M), name
    assert "pipeline_tag: zero-shot-image-classification" in out and "Not evaluated" in out


def test_joint_embedding_card_names_the_task_and_the_config_both_pipelines(joint_release):
    from modeling_mm.pipeline_mm import FEATURE_EXTRACTION_TASK, ZERO_SHOT_TASK

    card = ModelCard.load(joint_release / "README.md")
    check_card(card)
    data = card.data
    assert data.pipeline_tag == "zero-shot-image-classification" and data.library_name == "transformers"
    assert {"mm-fusion", "joint-embedding", "zero-shot", "retrieval", "image", "text", "audio"} <= set(data.tags)
    assert card_results(card) == joint_results(JOINT_REPORT)  # the model-index is training.report's
    body = card.text
    assert "A multimodal joint embedding model made with mm-fusion" in body
    assert "one 16-dimensional space, trained with a symmetric InfoNCE loss" in body
    assert "classification head" not in body and "labels:" not in body
    pipelines, step_by_step = python_blocks(body)
    assert f'pipeline("{ZERO_SHOT_TASK}", model="mm-fusion/joint", revision="main",' in pipelines
    assert f'pipeline("{FEATURE_EXTRACTION_TASK}", model="mm-fusion/joint", revision="main",' in pipelines
    assert pipelines.count("trust_remote_code=True") == 2
    assert "model.get_audio_features(" in step_by_step and "similarity = image_embeds @ text_embeds.T" in step_by_step
    assert "On 120 rows of the `test` split" in body and "| image->text r@1 | 0.6200 |" in body
    assert "| zero-shot shape (image) accuracy | 0.7100 |" in body

    config = json.loads((joint_release / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_mm.MMFusionContrastiveModel"
    assert "AutoModelForSequenceClassification" not in config["auto_map"]
    assert config["custom_pipelines"] == {
        ZERO_SHOT_TASK: {"impl": "pipeline_mm.MMFusionZeroShotClassificationPipeline", "pt": ["AutoModel"],
                         "type": "multimodal"},
        FEATURE_EXTRACTION_TASK: {"impl": "pipeline_mm.MMFusionFeatureExtractionPipeline", "pt": ["AutoModel"],
                                  "type": "multimodal"},
    }


def test_joint_embedding_report_without_classifier_sections_still_makes_a_card(contrastive_model_dir, tmp_path):
    retrieval_only = {key: JOINT_REPORT[key] for key in ("problem_type", "model", "data", "retrieval")}
    bare = {key: JOINT_REPORT[key] for key in ("model", "data")}  # nothing training.report can read
    for name, report, results in (("retrieval_only", retrieval_only, joint_results(retrieval_only)),
                                  ("bare", bare, set())):
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
        release = publish.build_release(contrastive_model_dir, tmp_path / name, "mm-fusion/joint",
                                        report=tmp_path / f"{name}.json")
        check_card(release.card)
        assert card_results(release.card) == results, name
        assert "On 120 rows of the `test` split of local data (`test.csv`). The report has no headline metrics." \
            in release.card.text
    with pytest.raises(ValueError, match="report: .* has no 'headline' section"):  # a classifier's still needs one
        publish.read_report(tmp_path / "bare.json")


def test_joint_embedding_release_runs_its_card_snippets_where_only_transformers_is_installed(
        joint_release, contrastive_model_dir, tmp_path):
    """Both card snippets, pointed at the release, in a fresh interpreter that cannot import the project: the two
    pipelines (trust_remote_code) and the step-by-step embeddings answer as the model does in-process."""
    from modeling_mm import MMFusionContrastiveModel
    from modeling_mm.pipeline_mm import FEATURE_EXTRACTION_TASK, ZERO_SHOT_TASK

    write_media(tmp_path)
    result = run_without_project([f"""
        import json
        names = {{}}
        for snippet in {card_snippets(joint_release, "mm-fusion/joint")!r}:
            exec(snippet, names)
        for loaded in (names["classifier"].model, names["extractor"].model, names["model"]):
            assert type(loaded).__module__.startswith("transformers_modules."), type(loaded).__module__
            assert type(loaded).__name__ == "MMFusionContrastiveModel", type(loaded).__name__
        with open("answers.json", "w") as file:
            json.dump({{"zero_shot": names["classifier"](image="image.png", candidate_labels={JOINT_LABELS!r}),
                       "embeddings": names["embeddings"], "similarity": names["similarity"].tolist()}}, file)
        loaded = [name for name in sys.modules if name.split(".")[0] in {PROJECT_PACKAGES!r}]
        assert not loaded, loaded
        print("OK")
    """], tmp_path)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]

    answers = json.loads((tmp_path / "answers.json").read_text())
    zero_shot = pipeline(ZERO_SHOT_TASK, model=str(contrastive_model_dir))
    expected = zero_shot(image=str(tmp_path / "image.png"), candidate_labels=JOINT_LABELS)
    assert [r["label"] for r in answers["zero_shot"]] == [r["label"] for r in expected]
    np.testing.assert_allclose([r["score"] for r in answers["zero_shot"]], [r["score"] for r in expected], atol=1e-6)
    extractor = pipeline(FEATURE_EXTRACTION_TASK, model=str(contrastive_model_dir))
    own = extractor(image=str(tmp_path / "image.png"), text="a caption", audio=str(tmp_path / "audio.wav"))
    assert list(answers["embeddings"]) == list(own) == ["image_embeds", "text_embeds", "audio_embeds"]
    for key, vector in own.items():
        np.testing.assert_allclose(answers["embeddings"][key], vector, atol=1e-6)
    model = MMFusionContrastiveModel.from_pretrained(contrastive_model_dir).eval()
    processor = AutoProcessor.from_pretrained(contrastive_model_dir)
    with torch.no_grad():
        texts = processor(text=JOINT_LABELS)
        similarity = (model.get_image_features(processor(images=[str(tmp_path / "image.png")])["pixel_values"])
                      @ model.get_text_features(texts["input_ids"], texts["attention_mask"],
                                                texts.get("token_type_ids")).T)
    np.testing.assert_allclose(answers["similarity"], similarity.numpy(), atol=1e-6)


def test_joint_embedding_adapter_only_release_loads_onto_its_base_like_the_trained_model(tiny, vit_dir, bert_dir,
                                                                                    wav2vec2_dir, tmp_path):
    """A LoRA-trained joint embedding model published as its adapter, on its towers' Hub ids or on a published
    mm-fusion model: the card's snippets (the base, the adapter, then the pipelines on the merged model) answer as the
    model that was trained."""
    from modeling_mm import MMFusionContrastiveModel
    from modeling_mm.pipeline_mm import FEATURE_EXTRACTION_TASK, ZERO_SHOT_TASK

    torch.manual_seed(0)
    model = MMFusionContrastiveModel.from_towers(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir, projection_dim=16,
                                                 **FUSION_KWARGS)
    cache = shutil.copytree(tiny["hub_cache"], tmp_path / "hub")  # the towers, and this untrained model as a base
    base_id = "mm-fusion-test/tiny-joint-base"
    model.save_pretrained(cache / f"models--{base_id.replace('/', '--')}" / "snapshots" / FAKE_COMMIT)
    (cache / f"models--{base_id.replace('/', '--')}" / "refs").mkdir()
    (cache / f"models--{base_id.replace('/', '--')}" / "refs" / "main").write_text(FAKE_COMMIT)
    peft_model = apply_lora(model, LoraSettings(vision_mode="lora", text_mode="lora", audio_mode="full"))
    with torch.no_grad():  # stands in for training, as in the `tiny` fixture
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    processor = MMFusionProcessor.from_towers(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir)
    adapter = save_trained_model(peft_model, tmp_path / "adapter", merge=False)
    processor.save_pretrained(adapter)

    snippets = {}
    for variant, bases in {"towers": TOWER_IDS, "model": {"model": base_id}}.items():
        release = tmp_path / variant
        assert main(["--model", str(adapter), "--repo-id", "mm-fusion/joint-lora", "--adapter-only", "--dry-run",
                     "--out", str(release), *[f"--base-model={key}={repo_id}" for key, repo_id in bases.items()]]) == 0
        config = json.loads((release / "config.json").read_text())
        assert config["auto_map"]["AutoModel"] == "modeling_mm.MMFusionContrastiveModel"
        assert set(config["custom_pipelines"]) == {ZERO_SHOT_TASK, FEATURE_EXTRACTION_TASK}
        card = ModelCard.load(release / "README.md")
        check_card(card)
        assert card.data.library_name == "peft" and card.data.pipeline_tag == "zero-shot-image-classification"
        snippets[variant] = card_snippets(release, "mm-fusion/joint-lora")

    write_media(tmp_path)
    answers = answers_of_card_snippets(
        snippets, f'{{"zero_shot": names["classifier"](image="image.png", candidate_labels={JOINT_LABELS!r}), '
                  '"embeddings": names["embeddings"]}', tmp_path, HF_HUB_CACHE=str(cache))

    merged = peft_model.merge_and_unload().eval()
    expected = pipeline(ZERO_SHOT_TASK, model=merged, processor=processor)(image=str(tmp_path / "image.png"),
                                                                           candidate_labels=JOINT_LABELS)
    own = pipeline(FEATURE_EXTRACTION_TASK, model=merged, processor=processor)(
        image=str(tmp_path / "image.png"), text="a caption", audio=str(tmp_path / "audio.wav"))
    for variant, answer in answers.items():
        assert [r["label"] for r in answer["zero_shot"]] == [r["label"] for r in expected], variant
        np.testing.assert_allclose([r["score"] for r in answer["zero_shot"]], [r["score"] for r in expected],
                                   atol=1e-5)
        for key, vector in own.items():
            np.testing.assert_allclose(answer["embeddings"][key], vector, atol=1e-5)


# ---- a generation model ----------------------------------------------------------------------------------------------

DECODER_FILES = {f"decoder_tokenizer/{name}" for name in ("tokenizer.json", "tokenizer_config.json",
                                                           "chat_template.jinja")}
GENERATION_RELEASE = TINY_RELEASE | {"generation_config.json"} | DECODER_FILES
DECODER_ID = "mm-fusion-test/tiny-gpt2"
# an mm-eval report.json of a generation model (training.evaluation's layout), cut down to what the card reads
GENERATION_REPORT = {
    "problem_type": "generation",
    "model": {"modalities": ["image", "text", "audio"]},
    "data": {"source": "/data/private/test.csv", "split": "test", "rows": 90,
             "columns": {"target": "answer", "prompt": "question"}},
    "headline": {"bleu": 41.2, "chrf": 63.5, "rouge_l": 0.71, "exact_match": 0.52},
    "ablation": [{"modalities": ["image"], "bleu": 20.1, "chrf": 40.2, "rouge_l": 0.5, "exact_match": 0.3,
                  "rows_without_modality": 0},
                 {"modalities": ["image", "text", "audio"], "bleu": 41.2, "chrf": 63.5, "rouge_l": 0.71,
                  "exact_match": 0.52, "rows_without_modality": 0}],
    "fusion_gain": {"metric": "chrf", "all_modalities": ["image", "text", "audio"], "all_modalities_value": 63.5,
                    "best_single_modality": "image", "best_single_modality_value": 40.2, "gain": 23.3},
    "examples": [{"row": 3, "group": "colour", "prompt": "Question: what colour? Answer:", "reference": " red",
                  "prediction": " red", "exact_match": 1.0},
                 {"row": 7, "group": "dialogue", "prompt": [{"role": "user", "content": "what shape | size?"}],
                  "reference": "a large star", "prediction": "a star", "exact_match": 0.0},
                 {"row": 9, "group": "describe", "prompt": None, "reference": "A red circle.",
                  "prediction": "A red\ncircle.", "exact_match": 0.0}],
    "task_type": "image-text-to-text",
}
GENERATION_TRAINING_ARGS = {"data": {"train_data": "/data/private/train.csv", "target_column": "answer",
                                     "prompt_column": "question"},
                            "lora": {"vision_mode": "frozen", "text_mode": "frozen", "audio_mode": "frozen",
                                     "decoder_mode": "full"}}
CARD_QUESTION = "Question: what colour is it? Answer:"  # the card's own example prompt


@pytest.fixture(scope="module")
def generation_release(generation_model_dir, tmp_path_factory) -> dict:
    """The tiny generation model with a training record, and its release (dry run) with GENERATION_REPORT and the
    decoder's Hub id."""
    root = tmp_path_factory.mktemp("generation")
    model_dir = shutil.copytree(generation_model_dir, root / "model")
    (model_dir / "training_args.json").write_text(json.dumps(GENERATION_TRAINING_ARGS))
    (root / "report.json").write_text(json.dumps(GENERATION_REPORT))
    assert main(["--model", str(model_dir), "--repo-id", "mm-fusion/generation", "--dry-run", "--out",
                 str(root / "release"), "--report", str(root / "report.json"),
                 f"--base-model=decoder={DECODER_ID}"]) == 0
    return {"model": model_dir, "release": root / "release", "root": root}


def test_generation_dry_run_lists_the_release_with_generation_config_and_decoder_tokenizer(
        generation_model_dir, fake_hub, capsys, tmp_path, vit_dir, gpt2_decoder_dir):
    from modeling_mm.pipeline_mm import GENERATION_TASK

    release = tmp_path / "release"
    assert main(["--model", str(generation_model_dir), "--repo-id", "mm-fusion/generation", "--dry-run", "--out",
                 str(release)]) == 0
    out = capsys.readouterr().out
    assert not fake_hub.calls and not fake_hub.uploads
    files = {p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file()}
    assert files == GENERATION_RELEASE
    assert all(any(fnmatch(name, pattern) for pattern in ALLOWED_FILES) for name in files)
    for name in GENERATION_RELEASE:
        assert re.search(rf"^  {re.escape(name)} +\d+(\.\d)? (B|kB|MB)$", out, flags=re.M), name
    # the model folder's decoder_tokenizer/ is rebuilt in the release, not reported as left out
    assert "left out of the model folder" not in out
    assert "pipeline_tag: image-text-to-text" in out and "Not evaluated" in out

    config_text = (release / "config.json").read_text()
    config = json.loads(config_text)
    assert config["auto_map"]["AutoModel"] == "modeling_mm.MMFusionForConditionalGeneration"
    assert "AutoModelForSequenceClassification" not in config["auto_map"]
    assert config["custom_pipelines"] == {GENERATION_TASK: {
        "impl": "pipeline_mm.MMFusionTextGenerationPipeline", "pt": ["AutoModel"], "type": "multimodal"}}
    assert vit_dir not in config_text and gpt2_decoder_dir not in config_text  # local paths stay local
    assert not config["decoder_config"].get("_name_or_path")
    # the generation settings and the decoder tokenizer (chat template and special tokens) are the model's own
    saved = json.loads((generation_model_dir / "generation_config.json").read_text())
    assert json.loads((release / "generation_config.json").read_text()) == saved
    original, published = (AutoProcessor.from_pretrained(folder).decoder_tokenizer
                           for folder in (generation_model_dir, release))
    assert published.chat_template == original.chat_template and published.get_vocab() == original.get_vocab()
    assert (published.bos_token, published.eos_token, published.pad_token) == \
        (original.bos_token, original.eos_token, original.pad_token)


def test_generation_upload_sends_the_decoder_tokenizer_folder(generation_model_dir, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert main(["--model", str(generation_model_dir), "--repo-id", "mm-fusion/generation"]) == 0
    assert set(fake_hub.uploads) == GENERATION_RELEASE
    upload = next(kwargs for name, kwargs in fake_hub.calls if name == "upload_folder")
    assert DECODER_FILES <= set(upload["allow_patterns"])


def test_generation_card_names_the_task_pipeline_and_evaluation(generation_release):
    from modeling_mm.pipeline_mm import GENERATION_TASK

    card = ModelCard.load(generation_release["release"] / "README.md")
    check_card(card)
    data = card.data
    assert data.pipeline_tag == "image-text-to-text" and data.library_name == "transformers"
    assert {"mm-fusion", "text-generation", "captioning", "question-answering", "dialogue"} <= set(data.tags)
    assert DECODER_ID in data.base_model
    body = card.text
    assert "A multimodal text generation model made with mm-fusion" in body
    assert f"the decoder LM `{DECODER_ID}` (gpt2), reading the fused token states by cross-attention" in body
    assert ("captioning (no prompt: a caption or description), question answering (a question as the prompt) and "
            "dialogue (a dialogue history as the prompt") in body
    assert "It was trained to write the `answer` column prompted by the `question` column" in body
    pipelines, step_by_step = python_blocks(body)
    assert f'pipeline("{GENERATION_TASK}", model="mm-fusion/generation", revision="main",' in pipelines
    assert "trust_remote_code=True" in pipelines and "prompt=history" in pipelines
    assert f'prompt="{CARD_QUESTION}"' in pipelines
    assert "model.generate(**inputs" in step_by_step and "processor.batch_decode(new_tokens)" in step_by_step
    assert "| decoder | `mm-fusion-test/tiny-gpt2` (gpt2)" in body and "decoder full" in body
    # the report: its headline, ablation, fusion gain and sample generations (table cells escaped)
    assert "On 90 rows of the `test` split of local data (`test.csv`)" in body and "| chrf | 63.5000 |" in body
    assert "| image + text + audio | 41.2000 |" in body and "Fusion gain: chrf" in body
    assert "### Sample generations" in body
    assert "| Question: what colour? Answer: | red | red |" in body
    assert r"| user: what shape \| size? | a large star | a star |" in body
    assert "| (none) | A red circle. | A red circle. |" in body
    assert "/data/private" not in body


def test_generation_card_takes_the_model_index_training_report_gives_or_none(generation_release, monkeypatch,
                                                                           tmp_path):
    """Whatever `training.report.model_index_results` makes of a generation report goes into the card; where it
    cannot read one (a report from before generation metrics, or a bare one), the card has no model-index."""
    import training.report
    from huggingface_hub import EvalResult

    model_dir = generation_release["model"]
    report = tmp_path / "report.json"
    report.write_text(json.dumps(GENERATION_REPORT))
    bleu = EvalResult(task_type="image-text-to-text", task_name="Multimodal text generation (image + text + audio)",
                      dataset_type="local", dataset_name="test.csv", dataset_split="test", metric_type="bleu",
                      metric_name="BLEU", metric_value=41.2)
    monkeypatch.setattr(training.report, "model_index_results", lambda *args, **kwargs: [bleu])
    card = publish.build_release(model_dir, tmp_path / "with", "mm-fusion/generation", report=report).card
    check_card(card)
    assert card_results(card) == {("bleu", "BLEU", 41.2, "test")}

    def unreadable(report, **kwargs):
        raise KeyError("accuracy")

    monkeypatch.setattr(training.report, "model_index_results", unreadable)
    card = publish.build_release(model_dir, tmp_path / "without", "mm-fusion/generation", report=report).card
    check_card(card)
    assert card.data.eval_results is None and "| bleu | 41.2000 |" in card.text
    monkeypatch.undo()
    # the real function: its entries, or none where it cannot read the report
    card = publish.build_release(model_dir, tmp_path / "real", "mm-fusion/generation", report=report).card
    check_card(card)
    try:
        expected = joint_results(GENERATION_REPORT)
    except (KeyError, TypeError, ValueError):  # a training.report from before generation metrics
        expected = set()
    assert card_results(card) == expected
    # a report with nothing but its data
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({key: GENERATION_REPORT[key] for key in ("model", "data")}))
    card = publish.build_release(model_dir, tmp_path / "bare", "mm-fusion/generation", report=bare).card
    check_card(card)
    assert "The report has no headline metrics." in card.text and card.data.eval_results is None
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**GENERATION_REPORT, "examples": "none"}))
    with pytest.raises(ValueError, match="report: examples in .* is not a list of rows"):
        publish.build_release(model_dir, tmp_path / "broken", "mm-fusion/generation", report=broken)


def test_generation_release_runs_its_card_snippets_where_only_transformers_is_installed(
        generation_release, generation_model_dir, tmp_path):
    """The card's two snippets, pointed at the release, in a fresh interpreter that cannot import the project: the
    pipeline (trust_remote_code) with no prompt, a question and a dialogue history, and generation step by step give
    the texts the model gives in-process."""
    from modeling_mm import MMFusionForConditionalGeneration
    from modeling_mm.pipeline_mm import GENERATION_TASK

    write_media(tmp_path)
    result = run_without_project([f"""
        import json
        names = {{}}
        for snippet in {card_snippets(generation_release["release"], "mm-fusion/generation")!r}:
            exec(snippet, names)
        for loaded in (names["generator"].model, names["model"], names["processor"]):
            assert type(loaded).__module__.startswith("transformers_modules."), type(loaded).__module__
        assert type(names["model"]).__name__ == "MMFusionForConditionalGeneration", type(names["model"]).__name__
        with open("answers.json", "w") as file:
            json.dump({{key: names[key] for key in ("caption", "answer", "reply", "texts", "history")}}, file)
        loaded = [name for name in sys.modules if name.split(".")[0] in {PROJECT_PACKAGES!r}]
        assert not loaded, loaded
        print("OK")
    """], tmp_path)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]

    answers = json.loads((tmp_path / "answers.json").read_text())
    image, audio = str(tmp_path / "image.png"), str(tmp_path / "audio.wav")
    generator = pipeline(GENERATION_TASK, model=str(generation_model_dir))
    assert answers["caption"] == generator(image=image, text="a caption", audio=audio)
    assert answers["answer"] == generator(image=image, prompt=CARD_QUESTION, max_new_tokens=16)
    assert answers["reply"] == generator(image=image, prompt=answers["history"], num_beams=3)
    model = MMFusionForConditionalGeneration.from_pretrained(generation_model_dir).eval()
    processor = AutoProcessor.from_pretrained(generation_model_dir)
    inputs = processor(images=[image], text=["a caption"], audio=[audio], prompt=[CARD_QUESTION])
    assert answers["texts"] == processor.batch_decode(model.generate(**inputs, max_new_tokens=16))


def test_a_generation_model_is_published_only_with_a_decoder_it_has_and_its_adapter_with_the_decoders_id(
        generation_model_dir, tiny, capsys, tmp_path):
    # an adapter folder of a generation model whose decoder came from a local folder (refused before loading)
    adapter = shutil.copytree(generation_model_dir, tmp_path / "adapter")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": None}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert main(["--model", str(adapter), "--repo-id", "mm-fusion/x", "--adapter-only", "--dry-run",
                 *[f"--base-model={key}={repo_id}" for key, repo_id in TOWER_IDS.items()]]) == 2
    assert re.search(r"base_model: the adapter loads onto its decoder LM, which came from .*; pass --base-model "
                     r"decoder=ORG/NAME", capsys.readouterr().err)
    assert main(["--model", str(tiny["merged"]), "--repo-id", "mm-fusion/x", "--dry-run",
                 f"--base-model=decoder={DECODER_ID}"]) == 2
    assert "base_model: decoder: the model has no decoder LM" in capsys.readouterr().err


CLASSIFIER_ID = "mm-fusion-test/tiny-classifier"  # a published classifier whose encoder a decoder learnt to read


def test_generation_adapter_only_releases_load_onto_their_bases_and_generate_as_the_trained_model(
        tiny, vit_dir, bert_dir, wav2vec2_dir, gpt2_decoder_dir, tmp_path):
    """A LoRA-trained generation model published as its adapter: on its towers' and decoder's Hub ids (fusion trained
    in full, in the adapter), and on a published classifier whose frozen encoder the decoder learnt to read
    (`from_encoder`). The card's snippets, in an interpreter that cannot import the project, generate the tokens the
    trained model generates (16 forced, greedy)."""
    from modeling_mm import MMFusionForConditionalGeneration

    cache = shutil.copytree(tiny["hub_cache"], tmp_path / "hub")

    def serve(repo_id: str, folder: Path) -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder, repo / "snapshots" / FAKE_COMMIT)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(FAKE_COMMIT)
        return repo / "snapshots" / FAKE_COMMIT

    serve(DECODER_ID, Path(gpt2_decoder_dir))
    torch.manual_seed(0)
    classifier = MMFusionForSequenceClassification.from_towers(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir,
                                                               num_labels=2, **FUSION_KWARGS)
    classifier.save_pretrained(tmp_path / "classifier")
    serve(CLASSIFIER_ID, tmp_path / "classifier")
    processor = MMFusionProcessor.from_towers(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir,
                                              decoder=gpt2_decoder_dir)
    built = {
        "towers": (MMFusionForConditionalGeneration.from_towers(
            vision=vit_dir, text=bert_dir, audio=wav2vec2_dir, decoder=gpt2_decoder_dir,
            decoder_connection="cross_attention", **FUSION_KWARGS), "full", {**TOWER_IDS, "decoder": DECODER_ID}),
        "encoder": (MMFusionForConditionalGeneration.from_encoder(
            tmp_path / "classifier", decoder=gpt2_decoder_dir, decoder_connection="cross_attention"), "frozen",
            {"model": CLASSIFIER_ID, "decoder": DECODER_ID}),
    }
    write_media(tmp_path)
    snippets, expected = {}, {}
    for variant, (model, fusion_mode, bases) in built.items():
        peft_model = apply_lora(model, LoraSettings(vision_mode="frozen", text_mode="lora", audio_mode="frozen",
                                                    decoder_mode="lora", fusion_mode=fusion_mode))
        with torch.no_grad():  # stands in for training
            for parameter in peft_model.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn_like(parameter) * 0.05)
        adapter = save_trained_model(peft_model, tmp_path / variant / "adapter", merge=False)
        processor.save_pretrained(adapter)
        release = tmp_path / variant / "release"
        assert main(["--model", str(adapter), "--repo-id", "mm-fusion/generation-lora", "--adapter-only",
                     "--dry-run", "--out", str(release),
                     *[f"--base-model={key}={repo_id}" for key, repo_id in bases.items()]]) == 0
        config = json.loads((release / "config.json").read_text())
        assert config["auto_map"]["AutoModel"] == "modeling_mm.MMFusionForConditionalGeneration"
        assert (release / "generation_config.json").is_file() and (release / "decoder_tokenizer").is_dir()
        card = ModelCard.load(release / "README.md")
        check_card(card)
        assert card.data.library_name == "peft" and ("from_encoder" in card.text) == (variant == "encoder")
        snippets[variant] = card_snippets(release, "mm-fusion/generation-lora")
        merged = peft_model.merge_and_unload().eval()
        inputs = processor(images=[str(tmp_path / "image.png")], text=["a caption"],
                           audio=[str(tmp_path / "audio.wav")], prompt=[publish.CARD_QUESTION])
        with torch.no_grad():
            expected[variant] = {"tokens": merged.generate(**inputs, max_new_tokens=16, min_new_tokens=16).tolist(),
                                 "logits": merged(**inputs).logits.tolist()}

    answers = answers_of_card_snippets(
        snippets, '{"tokens": names["model"].generate(**names["inputs"], max_new_tokens=16, min_new_tokens=16)'
                  '.tolist(), "logits": names["model"](**names["inputs"]).logits.tolist()}', tmp_path,
        HF_HUB_CACHE=str(cache))
    for variant, own in expected.items():  # the prompt's logits (the adapted decoder reading the context), and tokens
        assert answers[variant]["tokens"] == own["tokens"], variant
        np.testing.assert_allclose(answers[variant]["logits"], own["logits"], atol=1e-5)
