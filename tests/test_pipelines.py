"""The joint embedding pipelines (`mm-fusion-zero-shot-classification`, `mm-fusion-feature-extraction`): their answers
are the model's own (`get_*_features`, `logit_scale`, `logit_bias`) on the processor's outputs, for every input kind
and in batches, in-process through `transformers.pipeline(task, model=folder)` and through `trust_remote_code` where
only transformers is installed; bad input and models that cannot do the task are refused naming the argument.
The text generation pipeline (`mm-fusion-text-generation`): its texts are the processor, `model.generate` and
`processor.batch_decode` by hand, for any subset of modalities, prompts and dialogue histories, alone and in batches,
with generate()'s parameters passed through, in-process and through `trust_remote_code`; bad input is refused naming
the argument. (The classification pipeline's tests are in test_publish.py, next to the release it is published in.)"""

from __future__ import annotations

import copy
import functools
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
from transformers.generation.streamers import BaseStreamer

from conftest import (FUSION_KWARGS, PROJECT_PACKAGES, SAMPLING_RATE, WITHOUT_PROJECT, tiny_fusion_config,
                      tiny_gpt2_decoder_config)
from modeling_mm import MMFusionContrastiveModel, MMFusionForConditionalGeneration, MMFusionForSequenceClassification
from modeling_mm.pipeline_mm import (DEFAULT_HYPOTHESIS_TEMPLATES, DEFAULT_MAX_NEW_TOKENS, FEATURE_EXTRACTION_TASK,
                                     GENERATION_TASK, ZERO_SHOT_TASK)
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


# ---- text generation -------------------------------------------------------------------------------------------------

HISTORY = [{"role": "user", "content": "what shape is it?"}, {"role": "assistant", "content": "a star"},
           {"role": "user", "content": "and its colour?"}]
QUESTION = "Question: what colour is it? Answer:"


@pytest.fixture(scope="module")
def generation(generation_model_dir) -> dict:
    """The saved generation model and processor as a user loads them, and the pipeline made from the folder."""
    return {
        "model": MMFusionForConditionalGeneration.from_pretrained(generation_model_dir).eval(),
        "processor": AutoProcessor.from_pretrained(generation_model_dir),
        "generator": pipeline(GENERATION_TASK, model=str(generation_model_dir)),
    }


@torch.no_grad()
def own_generations(model, processor, samples: list[dict], **generate_kwargs) -> list[list[str]]:
    """By hand: the processor on the samples (every row's prompt, None for none), `model.generate`, then
    `processor.batch_decode`; the texts grouped per sample."""
    inputs = processor(text=[s.get("text") for s in samples], images=[s.get("image") for s in samples],
                       audio=[s.get("audio") for s in samples] if any("audio" in s for s in samples) else None,
                       prompt=[s.get("prompt") for s in samples])
    texts = processor.batch_decode(model.generate(**inputs, **generate_kwargs))
    per_sample = len(texts) // len(samples)
    return [texts[i : i + per_sample] for i in range(0, len(texts), per_sample)]


def generated(answer: list[dict]) -> list[str]:
    assert all(list(entry) == ["generated_text"] for entry in answer), answer
    return [entry["generated_text"] for entry in answer]


def generation_samples(media) -> list[dict]:
    """An image alone, audio alone, text alone, all three with a question, and an image with a dialogue history."""
    return [{"image": media["image_paths"][0]},
            {"audio": media["audio_paths"][1]},
            {"text": "a red circle with a high tone"},
            {"text": "the square is blue", "image": media["image_paths"][1], "audio": media["audio_paths"][0],
             "prompt": QUESTION},
            {"image": media["image_paths"][0], "prompt": HISTORY}]


def test_generation_is_processor_then_generate_then_batch_decode(generation, media):
    """Greedy: each sample's text is what the processor, `model.generate` and `processor.batch_decode` give by hand,
    alone and in batches of any size (a sample's text does not depend on its batch partners)."""
    model, processor, generator = generation["model"], generation["processor"], generation["generator"]
    samples = generation_samples(media)
    alone = [own_generations(model, processor, [sample], max_new_tokens=6)[0] for sample in samples]
    assert own_generations(model, processor, samples, max_new_tokens=6) == alone
    assert len({texts[0] for texts in alone}) > 1  # the inputs matter, even to this untrained model
    for sample, own in zip(samples, alone):
        prompt = sample.get("prompt")
        keywords = {key: value for key, value in sample.items() if key != "prompt"}
        assert generated(generator(**keywords, prompt=prompt, max_new_tokens=6)) == own
    for batch_size in (1, 2, 5):
        answers = generator(samples, max_new_tokens=6, batch_size=batch_size)
        assert [generated(answer) for answer in answers] == alone, batch_size
    # one prompt for every sample of a call, or one each, given as keywords
    images = media["image_paths"]
    question = [own_generations(model, processor, [{"image": image, "prompt": QUESTION}], max_new_tokens=6)[0]
                for image in images]
    assert [generated(a) for a in generator(image=images, prompt=QUESTION, max_new_tokens=6)] == question
    assert [generated(a) for a in generator(image=images, prompt=[QUESTION, None], max_new_tokens=6)] == \
        [question[0], own_generations(model, processor, [{"image": images[1]}], max_new_tokens=6)[0]]
    assert generated(generator(image=images[0], prompt=HISTORY, max_new_tokens=6)) == alone[4]


class Collect(BaseStreamer):
    """A streamer that keeps what generate() streams: the prompt first, then each new token."""

    def __init__(self):
        self.steps, self.ended = [], False

    def put(self, value):
        self.steps.append(value.flatten().tolist())

    def end(self):
        self.ended = True

    def new_tokens(self) -> list[int]:
        return [token for step in self.steps[1:] for token in step]


def generate_from_seed(generate, **kwargs):
    torch.manual_seed(0)
    return generate(**kwargs)


def test_generation_passes_generate_parameters_through(generation, media, monkeypatch):
    model, processor, generator = generation["model"], generation["processor"], generation["generator"]
    sample = {"image": media["image_paths"][0], "prompt": QUESTION}
    # beams and several sequences per sample, a sample's sequences next to each other
    beams = own_generations(model, processor, [sample, {"audio": media["audio_paths"][0]}], max_new_tokens=5,
                            num_beams=3, num_return_sequences=2)
    answers = generator([sample, {"audio": media["audio_paths"][0]}], max_new_tokens=5, num_beams=3,
                        num_return_sequences=2, batch_size=2)
    assert [generated(answer) for answer in answers] == beams and all(len(texts) == 2 for texts in beams)
    # sampling, from the same seed set right before generate() on both sides (the pipeline's DataLoader draws from
    # the global generator)
    for seeded in (model, generator.model):
        monkeypatch.setattr(seeded, "generate", functools.partial(generate_from_seed, seeded.generate))
    sampled = own_generations(model, processor, [sample], max_new_tokens=8, do_sample=True, top_k=0)
    assert generated(generator(sample, max_new_tokens=8, do_sample=True, top_k=0)) == sampled[0]
    assert sampled[0] != own_generations(model, processor, [sample], max_new_tokens=8)[0]  # not greedy
    monkeypatch.undo()
    # generate() arguments that are not generation-config fields: a streamer sees the new tokens
    streamer = Collect()
    answer = generator(sample, max_new_tokens=4, streamer=streamer)
    assert streamer.ended and 1 <= len(streamer.new_tokens()) <= 4
    assert processor.batch_decode([streamer.new_tokens()]) == generated(answer)
    # stop strings: generate() matches them through a tokenizer, the decoder's, which the pipeline hands it (this
    # test's WordPiece vocabulary is one transformers' StopStringCriteria cannot index, so generate() is spied on)
    seen = {}

    def spy(**kwargs):
        seen.update(kwargs)
        return real_generate(**{key: value for key, value in kwargs.items()
                                if key not in ("stop_strings", "tokenizer")})

    real_generate = generator.model.generate
    monkeypatch.setattr(generator.model, "generate", spy)
    generator(sample, max_new_tokens=2, stop_strings=["red"])
    assert seen["stop_strings"] == ["red"] and seen["tokenizer"] is generator.processor.decoder_tokenizer
    monkeypatch.undo()
    # special tokens kept on request
    with_special = generator(sample, max_new_tokens=6, skip_special_tokens=False)
    inputs = processor(images=[sample["image"]], prompt=[QUESTION])
    assert generated(with_special) == processor.batch_decode(model.generate(**inputs, max_new_tokens=6),
                                                             skip_special_tokens=False)


def test_generation_defaults_are_the_models_generation_config_then_the_pipelines(generation, media):
    """Without parameters: the model's saved `generation_config`, and the pipeline's `max_new_tokens` only where
    nothing sets a length; parameters given at construction serve every call, a call's own go over them."""
    model, processor, generator = generation["model"], generation["processor"], generation["generator"]
    sample = {"image": media["image_paths"][0], "prompt": QUESTION}
    own_default = own_generations(model, processor, [sample], max_new_tokens=DEFAULT_MAX_NEW_TOKENS)[0]
    assert generated(generator(sample)) == own_default
    configured = copy.deepcopy(model)
    configured.generation_config.max_new_tokens = 3
    configured.generation_config.num_beams = 2
    by_config = pipeline(GENERATION_TASK, model=configured, processor=processor)
    assert generated(by_config(sample)) == own_generations(configured, processor, [sample])[0]
    assert generated(by_config(sample)) == own_generations(model, processor, [sample], max_new_tokens=3,
                                                           num_beams=2)[0]
    # at construction (for every call) and per call (over it); generate_kwargs= as transformers' pipelines take it
    bound = pipeline(GENERATION_TASK, model=model, processor=processor, max_new_tokens=2)
    two = own_generations(model, processor, [sample], max_new_tokens=2)[0]
    assert generated(bound(sample)) == two
    assert generated(bound(sample, max_new_tokens=5)) == own_generations(model, processor, [sample],
                                                                         max_new_tokens=5)[0]
    assert generated(generator(sample, generate_kwargs={"max_new_tokens": 2})) == two
    streamer = Collect()  # not a generation-config field, and it serves every call too
    streaming = pipeline(GENERATION_TASK, model=model, processor=processor, streamer=streamer, max_new_tokens=3)
    answer = streaming(sample)
    assert streamer.ended and processor.batch_decode([streamer.new_tokens()]) == generated(answer)


@pytest.mark.parametrize("call, message", [
    (dict(), "text, image, audio: give at least one of them"),
    (dict(prompt="hello"), "text, image, audio: give at least one of them.*a prompt alone"),
    (dict(inputs=[{"prompt": "hello"}]), r"inputs\[0\]: the sample has no text, image or audio"),
    (dict(image="x.png", prompt=5), "prompt: expected a str, a dialogue history"),
    (dict(image=["x.png", "y.png"], prompt=["a", "b", "c"]), "prompt: 3 prompts for 2 samples"),
    (dict(inputs=[{"image": "x.png", "prompt": "a"}], prompt="b"), r"prompt: inputs\[0\] carries its own prompt"),
    (dict(inputs=[{"image": "x.png"}, {"image": "x.png", "prompt": 7}]), r"prompt\[1\]: expected a str"),
    (dict(image="x.png", prompt=[{"role": "user"}]), r"prompt\[0\]\[0\]: message without 'content'"),
    (dict(image="x.png", prompt=[{"role": "robot", "content": "hi"}]), "unknown role 'robot'"),
    (dict(image="x.png", prompt=HISTORY[:2]), r"prompt\[0\]\[1\]: a history may not end with an assistant"),
    (dict(inputs={"image": "x.png", "question": "why?"}), r"inputs\[0\]: unknown keys \['question'\]"),
    (dict(inputs=HISTORY), "inputs: this is a dialogue history, which is a prompt: pass it as prompt="),
    (dict(image=["x.png", "y.png"], text=["a"]), "text, image, audio: give one sample each or lists of one"),
    (dict(image="x.png", max_new_token=3), "max_new_token: not a parameter of MMFusionTextGenerationPipeline"),
    (dict(image="x.png", decoder_input_ids=[[2]]), "decoder_input_ids: not a parameter"),
    (dict(image="x.png", num_beams=2, generate_kwargs={"num_beams": 2}), "generate_kwargs, num_beams: given twice"),
    (dict(image="x.png", generate_kwargs=[("num_beams", 2)]), "generate_kwargs: expected a dict"),
    (dict(image="x.png", skip_special_tokens="yes"), "skip_special_tokens: expected True or False"),
    (dict(image="x.png", batch_size=0), "batch_size: expected a positive int"),
])
def test_generation_refuses_bad_input_naming_the_argument(generation, call, message):
    with pytest.raises(ValueError, match=message):
        generation["generator"](**call)


def test_generation_refuses_a_model_that_cannot_generate(generation, contrastive_model_dir, vit_dir, bert_dir,
                                                         wav2vec2_dir, gpt2_decoder_dir):
    classifier = MMFusionForSequenceClassification(tiny_fusion_config(num_labels=2)).eval()
    towers = dict(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir)
    with pytest.raises(ValueError, match="model: text generation needs an mm-fusion generation model "
                                         r"\(MMFusionForConditionalGeneration.* got MMFusionForSequenceClassification"):
        pipeline(GENERATION_TASK, model=classifier, processor=generation["processor"])
    with pytest.raises(ValueError, match="model: text generation .* got MMFusionContrastiveModel"):
        pipeline(GENERATION_TASK, model=str(contrastive_model_dir))
    with pytest.raises(ValueError, match="processor: text generation needs the model's MMFusionProcessor with its "
                                         "decoder_tokenizer"):
        pipeline(GENERATION_TASK, model=generation["model"], processor=MMFusionProcessor.from_towers(**towers))
    # a modality the model has no tower for, named before anything is decoded
    image_text = MMFusionForConditionalGeneration(tiny_fusion_config(
        ("vision", "text"), decoder_config=tiny_gpt2_decoder_config(), decoder_connection="cross_attention")).eval()
    generator = pipeline(GENERATION_TASK, model=image_text, processor=MMFusionProcessor.from_towers(
        vision=vit_dir, text=bert_dir, decoder=gpt2_decoder_dir))
    with pytest.raises(ValueError, match=r"inputs\[1\]\.audio: this model has no audio tower"):
        generator([{"text": "a"}, {"audio": "x.wav"}])


def test_generation_loads_by_trust_remote_code_and_generates_as_in_process(generation, media, generation_model_dir,
                                                                          tmp_path):
    release = tmp_path / "release"
    build_release(generation_model_dir, release, "mm-fusion/generation")
    images, clips = media["image_paths"], media["audio_paths"]
    calls = {"image": dict(image=images[0], max_new_tokens=6),
             "audio": dict(audio=clips[1], max_new_tokens=6),
             "text": dict(text="a red circle with a high tone", max_new_tokens=6),
             "question": dict(image=images, prompt=QUESTION, max_new_tokens=6),
             "batch": dict(inputs=[{"text": "the square is blue", "image": images[1], "audio": clips[0],
                                    "prompt": QUESTION}, {"image": images[0], "prompt": HISTORY},
                                   {"audio": clips[1]}], max_new_tokens=6, batch_size=2),
             "beams": dict(image=images[1], prompt=HISTORY, max_new_tokens=5, num_beams=3, num_return_sequences=2)}
    result = run_without_project(f"""
        import json
        from transformers import pipeline
        generator = pipeline("{GENERATION_TASK}", model={str(release)!r}, trust_remote_code=True)
        for loaded in (generator, generator.model, generator.processor):
            assert type(loaded).__module__.startswith("transformers_modules."), type(loaded).__module__
        assert type(generator.model).__name__ == "MMFusionForConditionalGeneration", type(generator.model).__name__
        answers = {{name: generator(**call) for name, call in {calls!r}.items()}}
        json.dump(answers, open("answers.json", "w"))
        loaded = [name for name in sys.modules if name.split(".")[0] in {PROJECT_PACKAGES!r}]
        assert not loaded, loaded
        print("OK")
    """, tmp_path)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]

    answers = json.loads((tmp_path / "answers.json").read_text())
    for name, call in calls.items():
        assert answers[name] == generation["generator"](**call), name
