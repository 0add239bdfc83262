"""The joint embedding pipelines (`mm-fusion-zero-shot-classification`, `mm-fusion-feature-extraction`): their answers
are the model's own (`get_*_features`, `logit_scale`, `logit_bias`) on the processor's outputs, for every input kind
and in batches, in-process through `transformers.pipeline(task, model=folder)` and through `trust_remote_code` where
only transformers is installed; bad input and models that cannot do the task are refused naming the argument.
(The classification pipeline's tests are in test_publish.py, next to the release it is published in.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from transformers import AutoProcessor, pipeline

from conftest import FUSION_KWARGS, PROJECT_PACKAGES, SAMPLING_RATE, WITHOUT_PROJECT, tiny_fusion_config
from modeling_mm import MMFusionContrastiveModel, MMFusionForSequenceClassification
from modeling_mm.pipeline_mm import DEFAULT_HYPOTHESIS_TEMPLATES, FEATURE_EXTRACTION_TASK, ZERO_SHOT_TASK
from processors import MMFusionProcessor
from training.publish import build_release

LABELS = ["a red circle", "a blue square", "a green star"]
TOLERANCE = 1e-6


# ---- fixtures: the saved joint embedding model, its pipelines, and media in every form ------------------------------

@pytest.fixture(scope="module")
def joint(contrastive_model_dir) -> dict:
    """The saved model and processor as a user loads them, and both pipelines made from the folder in-process."""
    return {
        "model": MMFusionContrastiveModel.from_pretrained(contrastive_model_dir).eval(),
        "processor": AutoProcessor.from_pretrained(contrastive_model_dir),
        "zero_shot": pipeline(ZERO_SHOT_TASK, model=str(contrastive_model_dir)),
        "extractor": pipeline(FEATURE_EXTRACTION_TASK, model=str(contrastive_model_dir)),
    }


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    """Two images and two clips of different lengths as files, and the first of each as bytes and arrays."""
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (30 + 10 * i, 40, 3), dtype=np.uint8) for i in range(2)]
    clips = [(rng.standard_normal(4000 + 1500 * i) * 0.1).astype(np.float32) for i in range(2)]
    for i, (image, clip) in enumerate(zip(images, clips)):
        Image.fromarray(image).save(root / f"image{i}.png")
        soundfile.write(root / f"clip{i}.wav", clip, SAMPLING_RATE, subtype="FLOAT")
    return {
        "image_paths": [str(root / f"image{i}.png") for i in range(2)], "image_arrays": images,
        "audio_paths": [str(root / f"clip{i}.wav") for i in range(2)], "audio_arrays": clips,
        "image_bytes": (root / "image0.png").read_bytes(), "audio_bytes": (root / "clip0.wav").read_bytes(),
    }


# ---- what the pipelines must equal: the model's own features and logits on the processor's outputs ------------------

@torch.no_grad()
def own_features(model, processor, modality: str, items: list, normalize: bool = True) -> torch.Tensor:
    """`get_{modality}_features` on the processor's batch of `items` alone."""
    if modality == "text":
        texts = processor(text=items)
        return model.get_text_features(texts["input_ids"], texts["attention_mask"], texts.get("token_type_ids"),
                                       normalize=normalize)
    if modality == "image":
        return model.get_image_features(processor(images=items)["pixel_values"], normalize=normalize)
    clips = processor(audio=items, sampling_rate=SAMPLING_RATE)
    return model.get_audio_features(clips["input_values"], clips["audio_attention_mask"], normalize=normalize)


@torch.no_grad()
def own_scores(model, processor, modality: str, items: list, labels: list[str], template: str) -> list[dict]:
    """Per item, {label: score} by hand: `exp(logit_scale)` (clamped at 100) times the cosines, softmax over the
    labels, or sigmoid of those logits plus `logit_bias` for a sigmoid-loss model."""
    text_embeds = own_features(model, processor, "text", [template.format(label) for label in labels])
    logits = model.logit_scale.exp().clamp(max=100) * own_features(model, processor, modality, items) @ text_embeds.T
    scores = logits.softmax(-1) if model.logit_bias is None else torch.sigmoid(logits + model.logit_bias)
    return [dict(zip(labels, row)) for row in scores.tolist()]


def assert_ranked_as(answer: list[dict], expected: dict[str, float]) -> None:
    """`answer` holds every label once, best first, with the expected score."""
    assert [r["label"] for r in answer] == sorted(expected, key=lambda label: -expected[label])
    assert [r["score"] for r in answer] == sorted((r["score"] for r in answer), reverse=True)
    np.testing.assert_allclose([r["score"] for r in answer], [expected[r["label"]] for r in answer],
                               atol=TOLERANCE, rtol=0)


# ---- zero-shot classification ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("modality", ["image", "audio"])
def test_zero_shot_scores_are_the_models_softmax_of_scaled_cosines(joint, media, modality):
    model, processor, zero_shot = joint["model"], joint["processor"], joint["zero_shot"]
    paths = media[f"{modality}_paths"]
    default = DEFAULT_HYPOTHESIS_TEMPLATES["vision" if modality == "image" else "audio"]
    expected = own_scores(model, processor, modality, paths, LABELS, default)
    for path, own in zip(paths, expected):
        answer = zero_shot(**{modality: path}, candidate_labels=LABELS)
        assert_ranked_as(answer, own)
        assert sum(r["score"] for r in answer) == pytest.approx(1.0, abs=1e-6)
    # the template is what the labels are embedded in
    custom = own_scores(model, processor, modality, paths[:1], LABELS, "it is {}!")
    assert_ranked_as(zero_shot(**{modality: paths[0]}, candidate_labels=LABELS, hypothesis_template="it is {}!"),
                     custom[0])
    assert custom[0] != pytest.approx(expected[0], abs=1e-4)


def test_zero_shot_takes_paths_bytes_pil_arrays_positionally_and_in_batches(joint, media):
    zero_shot = joint["zero_shot"]
    model, processor = joint["model"], joint["processor"]
    image = own_scores(model, processor, "image", media["image_paths"], LABELS, DEFAULT_HYPOTHESIS_TEMPLATES["vision"])
    audio = own_scores(model, processor, "audio", media["audio_arrays"], LABELS, DEFAULT_HYPOTHESIS_TEMPLATES["audio"])
    first_image = [media["image_paths"][0], media["image_bytes"], Image.open(media["image_paths"][0]),
                   media["image_arrays"][0]]
    for item in first_image:
        assert_ranked_as(zero_shot(image=item, candidate_labels=LABELS), image[0])
        assert_ranked_as(zero_shot(item, candidate_labels=LABELS), image[0])  # told an image by its kind
    for item in (media["audio_paths"][0], media["audio_bytes"], (SAMPLING_RATE, media["audio_arrays"][0]),
                 {"array": media["audio_arrays"][0], "sampling_rate": SAMPLING_RATE}):
        assert_ranked_as(zero_shot(item, candidate_labels=LABELS), audio[0])
    assert_ranked_as(zero_shot(audio=media["audio_arrays"][0], sampling_rate=SAMPLING_RATE, candidate_labels=LABELS),
                     audio[0])
    # batches: per item as alone, whatever the batch size (the clips differ in length, so padding is exercised)
    for batch_size in (1, 2):
        for answers, expected in ((zero_shot(media["image_paths"], candidate_labels=LABELS, batch_size=batch_size),
                                   image),
                                  (zero_shot(audio=media["audio_paths"], candidate_labels=LABELS,
                                             batch_size=batch_size), audio)):
            assert len(answers) == 2
            for answer, own in zip(answers, expected):
                assert_ranked_as(answer, own)
    # labels given at construction serve every call
    bound = pipeline(ZERO_SHOT_TASK, model=model, processor=processor, candidate_labels=LABELS[:2])
    assert [r["label"] for r in bound(image=first_image[0])] == sorted(LABELS[:2], key=lambda label: -image[0][label])


@pytest.fixture(scope="module")
def image_text_sigmoid(vit_dir, bert_dir) -> dict:
    """A tiny image + text model trained with SigLIP's sigmoid loss, scale and bias set so the scores spread."""
    torch.manual_seed(0)
    model = MMFusionContrastiveModel.from_towers(vision=vit_dir, text=bert_dir, projection_dim=16,
                                                 contrastive_loss="sigmoid", **FUSION_KWARGS).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
        model.logit_bias.fill_(0.3)
    return {"model": model, "processor": MMFusionProcessor.from_towers(vision=vit_dir, text=bert_dir)}


def test_zero_shot_with_a_sigmoid_loss_model_scores_each_label_by_its_sigmoid(image_text_sigmoid, media):
    model, processor = image_text_sigmoid["model"], image_text_sigmoid["processor"]
    zero_shot = pipeline(ZERO_SHOT_TASK, model=model, processor=processor)
    expected = own_scores(model, processor, "image", media["image_paths"], LABELS,
                          DEFAULT_HYPOTHESIS_TEMPLATES["vision"])
    for answer, own in zip(zero_shot(media["image_paths"], candidate_labels=LABELS, batch_size=2), expected):
        assert_ranked_as(answer, own)
    assert sum(r["score"] for r in answer) != pytest.approx(1.0, abs=1e-3)  # independent decisions, not a softmax
    # the model has no audio tower, so a positional path is taken as an image by elimination
    assert_ranked_as(zero_shot(media["image_paths"][0], candidate_labels=LABELS), expected[0])


# ---- feature extraction ----------------------------------------------------------------------------------------------

def test_feature_extraction_gives_each_modalitys_own_embedding(joint, media):
    model, processor, extractor = joint["model"], joint["processor"], joint["extractor"]
    images, clips = media["image_paths"], media["audio_arrays"]
    samples = [{"text": "a red circle", "image": images[0]},
               {"audio": clips[0], "sampling_rate": SAMPLING_RATE},
               {"text": "the square is blue and large", "image": images[1], "audio": clips[1],
                "sampling_rate": SAMPLING_RATE},
               {"image": images[0]}]
    expected = {"text": own_features(model, processor, "text", ["a red circle", "the square is blue and large"]),
                "image": own_features(model, processor, "image", [images[0], images[1], images[0]]),
                "audio": own_features(model, processor, "audio", clips)}
    rows = {"text": [0, 2], "image": [0, 2, 3], "audio": [1, 2]}  # the samples that have each modality, in order
    for batch_size in (1, 3, 4):
        answers = extractor(samples, batch_size=batch_size)
        assert [list(answer) for answer in answers] == [["image_embeds", "text_embeds"], ["audio_embeds"],
                                                        ["image_embeds", "text_embeds", "audio_embeds"],
                                                        ["image_embeds"]]
        for modality, indices in rows.items():
            given = np.array([answers[i][f"{modality}_embeds"] for i in indices])
            np.testing.assert_allclose(given, expected[modality].numpy(), atol=TOLERANCE, rtol=0)
            np.testing.assert_allclose(np.linalg.norm(given, axis=1), 1.0, atol=1e-5)
    assert extractor(samples[0]) == extractor(text="a red circle", image=images[0])  # a dict or keywords alike

    # unnormalised, as tensors, and the fused embedding of each sample's modalities
    raw = extractor(samples, normalize=False, return_tensors=True, return_fused=True, batch_size=4)
    assert isinstance(raw[0]["text_embeds"], torch.Tensor) and raw[0]["text_embeds"].shape == (16,)
    unnormalised = own_features(model, processor, "text", ["a red circle", "the square is blue and large"],
                                normalize=False)
    torch.testing.assert_close(torch.stack([raw[0]["text_embeds"], raw[2]["text_embeds"]]), unnormalised,
                               atol=TOLERANCE, rtol=0)
    batch = processor(text=[s.get("text") for s in samples], images=[s.get("image") for s in samples],
                      audio=[s.get("audio") for s in samples], sampling_rate=SAMPLING_RATE)
    with torch.no_grad():
        fused = model.get_fused_features(normalize=False, **batch)
    torch.testing.assert_close(torch.stack([answer["fused_embeds"] for answer in raw]), fused, atol=TOLERANCE, rtol=0)


# ---- refusals --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task, call, message", [
    (ZERO_SHOT_TASK, dict(image="x.png"), "candidate_labels: give the labels"),
    (ZERO_SHOT_TASK, dict(image="x.png", candidate_labels=[]), "candidate_labels: give at least one label"),
    (ZERO_SHOT_TASK, dict(image="x.png", candidate_labels="cat"), "candidate_labels: expected a list"),
    (ZERO_SHOT_TASK, dict(image="x.png", candidate_labels=["cat", " "]), r"candidate_labels\[1\]: expected a non"),
    (ZERO_SHOT_TASK, dict(image="x.png", candidate_labels=["cat", "cat"]), r"candidate_labels: \['cat'\] given more"),
    (ZERO_SHOT_TASK, dict(image="x.png", candidate_labels=LABELS, hypothesis_template="a photo of"),
     "hypothesis_template: expected a str with '{}'"),
    (ZERO_SHOT_TASK, dict(image="x.png", candidate_labels=LABELS, hypothesis_template="{} of {kind}"),
     "hypothesis_template: .* is not a format string"),
    (ZERO_SHOT_TASK, dict(image="x.png", audio="x.wav", candidate_labels=LABELS), "image, audio: give one of them"),
    (ZERO_SHOT_TASK, dict(candidate_labels=LABELS), "inputs: give an image"),
    (ZERO_SHOT_TASK, dict(inputs="x.png", image="x.png", candidate_labels=LABELS), "inputs: give the items either"),
    (ZERO_SHOT_TASK, dict(inputs=np.zeros((40, 40)), candidate_labels=LABELS), r"inputs\[0\]: cannot tell whether"),
    (ZERO_SHOT_TASK, dict(inputs=["x.png", "x.wav"], candidate_labels=LABELS), "inputs: the batch mixes"),
    (ZERO_SHOT_TASK, dict(image=["x.png", None], candidate_labels=LABELS), r"image\[1\]: is None"),
    (ZERO_SHOT_TASK, dict(image="x.png", candidate_labels=LABELS, batch_size=0), "batch_size: expected a positive"),
    (ZERO_SHOT_TASK, dict(image="x.png", candidate_labels=LABELS, colour="red"), "colour: not a parameter"),
    (FEATURE_EXTRACTION_TASK, dict(), "text, image, audio: give at least one"),
    (FEATURE_EXTRACTION_TASK, dict(inputs={"video": "x.mp4"}), r"inputs\[0\]: unknown keys \['video'\]"),
    (FEATURE_EXTRACTION_TASK, dict(text="a", normalize="yes"), "normalize: expected True or False"),
    (FEATURE_EXTRACTION_TASK, dict(text="a", colour="red"), "colour: not a parameter"),
])
def test_pipelines_refuse_bad_input_naming_the_argument(joint, task, call, message):
    pipe = joint["zero_shot" if task == ZERO_SHOT_TASK else "extractor"]
    with pytest.raises(ValueError, match=message):
        pipe(**call)


def test_pipelines_refuse_a_model_that_cannot_do_their_task(vit_dir, wav2vec2_dir, image_text_sigmoid, media):
    classifier = MMFusionForSequenceClassification(tiny_fusion_config(num_labels=2)).eval()
    for task in (ZERO_SHOT_TASK, FEATURE_EXTRACTION_TASK):
        with pytest.raises(ValueError, match="model: .* needs an mm-fusion joint embedding model .* got "
                                             "MMFusionForSequenceClassification"):
            pipeline(task, model=classifier, processor=image_text_sigmoid["processor"])
    without_text = MMFusionContrastiveModel(tiny_fusion_config(("vision", "audio"), projection_dim=16)).eval()
    processor = MMFusionProcessor.from_towers(vision=vit_dir, audio=wav2vec2_dir)
    with pytest.raises(ValueError, match="model: zero-shot classification compares with label texts, but this model "
                                         "has no text tower"):
        pipeline(ZERO_SHOT_TASK, model=without_text, processor=processor)
    assert list(pipeline(FEATURE_EXTRACTION_TASK, model=without_text, processor=processor)(
        image=media["image_paths"][0])) == ["image_embeds"]
    # a modality the model has no tower for
    image_text = image_text_sigmoid
    zero_shot = pipeline(ZERO_SHOT_TASK, model=image_text["model"], processor=image_text["processor"])
    with pytest.raises(ValueError, match="audio: this model has no audio tower"):
        zero_shot(audio=media["audio_paths"][0], candidate_labels=LABELS)
    extractor = pipeline(FEATURE_EXTRACTION_TASK, model=image_text["model"], processor=image_text["processor"])
    with pytest.raises(ValueError, match=r"inputs\[1\]\.audio: this model has no audio tower"):
        extractor([{"text": "a"}, {"audio": media["audio_paths"][0]}])


# ---- trust_remote_code: the published folder, where only transformers is installed ---------------------------------

def run_without_project(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter that cannot import the project (conftest.WITHOUT_PROJECT)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules"),
                   "OMP_NUM_THREADS": "1"}
    environment.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-I", "-c", WITHOUT_PROJECT + textwrap.dedent(script)], cwd=cwd,
                          env=environment, capture_output=True, text=True, timeout=300)


def test_both_pipelines_load_by_trust_remote_code_and_answer_as_in_process(joint, media, contrastive_model_dir,
                                                                          tmp_path):
    release = tmp_path / "release"
    build_release(contrastive_model_dir, release, "mm-fusion/joint")
    # (pipeline, call): the same calls in both interpreters
    calls = {"zero_shot_images": ("zero_shot", dict(inputs=media["image_paths"], candidate_labels=LABELS,
                                                    batch_size=2)),
             "zero_shot_audio": ("zero_shot", dict(audio=media["audio_paths"][1], candidate_labels=LABELS,
                                                   hypothesis_template="the noise of {}")),
             "features": ("extractor", dict(inputs=[{"text": "a red circle", "image": media["image_paths"][0]},
                                                    {"audio": media["audio_paths"][0]}], return_fused=True,
                                            batch_size=2))}
    result = run_without_project(f"""
        import json
        from transformers import pipeline
        pipes = {{"zero_shot": pipeline("{ZERO_SHOT_TASK}", model={str(release)!r}, trust_remote_code=True),
                  "extractor": pipeline("{FEATURE_EXTRACTION_TASK}", model={str(release)!r}, trust_remote_code=True)}}
        for pipe in pipes.values():
            for loaded in (pipe, pipe.model, pipe.processor):
                assert type(loaded).__module__.startswith("transformers_modules."), type(loaded).__module__
        answers = {{name: pipes[pipe](**call) for name, (pipe, call) in {calls!r}.items()}}
        json.dump(answers, open("answers.json", "w"))
        loaded = [name for name in sys.modules if name.split(".")[0] in {PROJECT_PACKAGES!r}]
        assert not loaded, loaded
        print("OK")
    """, tmp_path)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]

    answers = json.loads((tmp_path / "answers.json").read_text())
    for name, (pipe, call) in calls.items():
        expected = joint[pipe](**call)
        if name == "features":
            assert [list(a) for a in answers[name]] == [list(e) for e in expected]
            for answer, own in zip(answers[name], expected):
                for key in own:
                    np.testing.assert_allclose(answer[key], own[key], atol=TOLERANCE, rtol=0)
        else:
            for answer, own in zip(*(x if isinstance(x[0], list) else [x] for x in (answers[name], expected))):
                assert_ranked_as(answer, {r["label"]: r["score"] for r in own})
