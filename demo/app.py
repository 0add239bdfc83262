"""`mm-demo`: a Gradio web app for any mm-fusion classifier.

    mm-demo                                         # the README's sample model (outputs/sample/model)
    mm-demo --model outputs/my-run/model            # a folder written by mm-train (merged model or peft adapter)
    mm-demo --model user/repo --trust_remote_code   # a Hub model that carries its own code
    python demo/app.py ...                          # the same, from a checkout without installing

The page shows one input per modality the model has (image: upload, webcam, clipboard; text; audio: upload,
microphone), every one optional, and answers with the labels' probabilities, a chart of what each given input
added to the predicted label (its probability minus the probability with that input withheld), and the latency.

Requests are queued (bounded, with a concurrency limit) and run in batches; each request of a batch is decoded and
checked on its own (`processors.media` limits), so a bad file gives that request a readable error and leaves the
others, and the server, alone. Uploads live in a temporary folder that is swept while the server runs
(`--delete_cache`) and removed when it stops. The server binds to 127.0.0.1 unless `--host` (or
GRADIO_SERVER_NAME) says otherwise, refuses uploads over `--max_file_size`, and serves no files besides the
uploads and its copies of the examples (no `allowed_paths`).

As a Hugging Face Space: set the Space's `app_file` to `demo/app.py` and the variable `MM_FUSION_MODEL` to a model
folder in the Space or a Hub id (`MM_FUSION_TRUST_REMOTE_CODE=1` to run a Hub model's own code,
`MM_FUSION_EXAMPLES` for an examples folder). Spaces set GRADIO_SERVER_NAME=0.0.0.0 themselves.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if not __package__:
    # `python demo/app.py` (how Spaces start an app) puts demo/ first on sys.path, not the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import PIL.Image
import torch

import gradio as gr
from gradio.utils import get_upload_folder
from modeling_mm.configuration_mm import MODALITY_NAMES
from processors.media import MediaLimits, load_audio, load_image
from training.interpretability import contributions
from training.scoring import encode_towers, forward_kept, presence, problem_type_of, scores

logger = logging.getLogger("mm_fusion.demo")

DEFAULT_MODEL = "outputs/sample/model"  # what the README's main job writes
EXAMPLES_FILE = "examples.csv"
MAX_EXAMPLES = 12
MAX_TEXT_CHARACTERS = 10_000
"""Longer text is refused before tokenizing: the tokenizer would read all of it only to truncate."""
MAX_DESCRIPTION_CHARACTERS = 400
# the model config names the vision modality "vision"; the page and the per-sample view call its input "image"
INPUT_NAMES = {modality: names.user for modality, names in MODALITY_NAMES.items()}
IMAGE_INPUT_HEIGHT = 300
"""Pixels: without a fixed height, Gradio 6 shrinks the image input to a thin strip once an example fills it."""
PAGE_CSS = "#mm-image img { object-fit: contain; }"
"""Gradio shows an image with `object-fit: scale-down`, which never enlarges: a 32-pixel sample image stayed a
32-pixel thumbnail in the input. `contain` scales it to the input's height (larger images still shrink to fit).
Passed to `launch()` (Gradio 6 takes CSS there only); a host that launches `demo` itself passes `css=PAGE_CSS`."""


# ---- the model -------------------------------------------------------------------------------------------------------


def load_model(model_path: str, trust_remote_code: bool = False, device: str | None = None):
    """Load an mm-fusion classifier and its processor for inference: `model_path` is a folder written by mm-train
    (a merged model, or a peft adapter folder, which is merged here) or a Hub id. The model goes to `device`
    (default: CUDA when available, else CPU), in eval mode, in bf16 on a GPU that supports it.

    `trust_remote_code` runs the code a Hub model carries (its `auto_map`); without it the classes come from this
    package. Returns `(model, processor)`. Raises `ValueError` for a model without a classification head.
    """
    from transformers import AutoModelForSequenceClassification, AutoProcessor

    # a Hub id is "name" or "owner/name"; anything else is a folder, and a missing one deserves a plain message
    if not Path(model_path).exists() and (model_path.startswith((".", "/", "~")) or model_path.count("/") > 1):
        hint = " (run ./run.sh to train the sample model)" if model_path == DEFAULT_MODEL else ""
        raise ValueError(f"model: no folder {model_path!r}{hint}; pass --model with a model folder or Hub id")
    if not trust_remote_code:
        import modeling_mm  # noqa: F401  (registers mm_fusion with the Auto classes)
    if (Path(model_path) / "adapter_config.json").exists():
        from training.lora import load_trained_model

        model = load_trained_model(model_path).merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    config = model.config
    if getattr(config, "model_type", None) != "mm_fusion":
        raise ValueError(f"model: {model_path!r} is a {config.model_type!r} model, not an mm-fusion model")
    if config.problem_type == "regression" or config.num_labels < 2:
        raise ValueError(f"model: {model_path!r} is a regression model; mm-demo shows classifiers")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # Loading straight into bf16 can leave composite towers in float32 (DESIGN.md); casting after loading cannot
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    return model.to(device=device, dtype=dtype).eval(), processor


@dataclass
class Sample:
    """One request's inputs, decoded and checked: an RGB image, text, a mono waveform at the model's rate."""

    image: PIL.Image.Image | None = None
    text: str | None = None
    audio: np.ndarray | None = None


def decode_sample(
    image: Any = None, text: str | None = None, audio: Any = None, *, sampling_rate: int = 16_000,
    limits: MediaLimits = MediaLimits(),
) -> Sample:
    """Decode one request's inputs through `processors.media`: `image` and `audio` are what Gradio sends (a file
    dict with a `path`, a path, PIL images and arrays of any mode, `(rate, int16 array)` microphone tuples of any
    rate and channel count) or None; empty or whitespace-only text counts as no text.

    Raises `ValueError` naming the input and the limit for anything `load_image`/`load_audio` refuse, for text over
    `MAX_TEXT_CHARACTERS` or not valid Unicode, and when no input is given at all.
    """
    if text is not None and not isinstance(text, str):
        raise ValueError(f"text: expected a string; got {type(text).__name__}")
    text = text if text and text.strip() else None
    if text is not None:
        if len(text) > MAX_TEXT_CHARACTERS:
            raise ValueError(f"text: {len(text)} characters is more than {MAX_TEXT_CHARACTERS}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"text: not valid Unicode at position {err.start}") from None
    sample = Sample(
        image=None if image is None else load_image(image, limits, name="image"),
        text=text,
        audio=None if audio is None else load_audio(audio, sampling_rate, limits=limits, name="audio"),
    )
    if sample.image is None and sample.text is None and sample.audio is None:
        raise ValueError("no input: give an image, a text or an audio clip (any one of them is enough)")
    return sample


@torch.inference_mode()
def classify(model, processor, samples: list[Sample]) -> list[dict[str, Any] | Exception]:
    """Classify `samples` in one batch and say what each given input added.

    Returns, per sample, `{"probabilities": {label: p}, "predicted": label, "contributions": {input: delta}}`, where
    an input's contribution is the predicted label's probability minus its probability with that input withheld
    through the `has_*` masks (the per-sample view of the evaluation); a sample with a single input has nothing
    left to withhold to, so its input is compared with the uniform prior (softmax) or 0.5 (multi-label). Where
    the batch fails, each sample runs alone, so a failing sample returns its exception and the others a result.
    """
    if not samples:
        return []
    try:
        return _classify_batch(model, processor, samples)
    except Exception as err:
        if len(samples) == 1:
            return [err]
        return [result for sample in samples for result in classify(model, processor, [sample])]


def _classify_batch(model, processor, samples: list[Sample]) -> list[dict[str, Any]]:
    config = model.config
    sampling_rate = processor.feature_extractor.sampling_rate if processor.feature_extractor is not None else None
    batch = processor(
        text=[s.text for s in samples] if processor.tokenizer is not None else None,
        images=[s.image for s in samples] if processor.image_processor is not None else None,
        audio=[s.audio for s in samples] if processor.feature_extractor is not None else None,
        sampling_rate=sampling_rate,
    )
    # the towers once, then the fusion with everything and with each modality withheld (the evaluation's scoring)
    problem_type = problem_type_of(model)
    states = encode_towers(model, batch)
    probabilities = scores(forward_kept(model, batch, config.modalities, tower_states=states)[0], problem_type)
    without = {m: scores(forward_kept(model, batch, [o for o in config.modalities if o != m], tower_states=states)[0],
                         problem_type) for m in config.modalities}
    change = contributions(probabilities, without)
    given = presence(batch)

    labels = [config.id2label[i] for i in range(config.num_labels)]
    results = []
    for index in range(len(samples)):
        predicted = int(probabilities[index].argmax())
        results.append({
            "probabilities": {label: float(p) for label, p in zip(labels, probabilities[index])},
            "predicted": labels[predicted],
            "contributions": {MODALITY_NAMES[m].user: float(change[m][index]) for m in config.modalities
                              if bool(given[m][index])},
        })
    return results


# ---- the page --------------------------------------------------------------------------------------------------------


def describe_model(model_path: str, config) -> tuple[str, str]:
    """The header's model name and a short, link-free description: the model card's first paragraph (from
    `README.md` in a local folder, or the Hub card), else one written from the config."""
    folder = Path(model_path)
    # mm-train writes <output_dir>/model: the run's folder names it better than "model"
    name = (folder.parent.name if folder.name == "model" else folder.name) if folder.exists() else model_path
    text = ""
    try:
        from huggingface_hub import ModelCard

        if (folder / "README.md").is_file():
            card = ModelCard.load(folder / "README.md")
        elif not folder.exists():
            card = ModelCard.load(model_path)
        else:
            card = None
        if card is not None:
            name = card.data.to_dict().get("model_name") or name
            text = _first_paragraph(card.text)
    except Exception as err:  # offline, no card on the Hub, a malformed card: the config still describes the model
        logger.info("no model card for %s (%s); describing the model from its config", model_path, err)
    if not text:
        inputs = ", ".join(INPUT_NAMES[m] for m in config.modalities)
        text = f"An mm-fusion classifier that reads {inputs} and fuses them with cross-attention."
    return name, text


def _first_paragraph(markdown: str) -> str:
    """The first prose paragraph of a card with links, images, HTML and URLs removed, cut at a word boundary."""
    for block in re.split(r"\n\s*\n", markdown):
        block = re.sub(r"<!--.*?-->|<[^>]+>", "", block, flags=re.S).strip()
        if not block or block.startswith(("#", "|", "```", "-", "*", ">")):
            continue
        block = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", block)  # images
        block = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", block)  # links keep their text
        block = re.sub(r"\b(?:https?|ftp)://\S+|\bwww\.\S+", "", block)
        block = " ".join(block.replace("`", "").split())
        if len(block) > MAX_DESCRIPTION_CHARACTERS:
            block = block[:MAX_DESCRIPTION_CHARACTERS].rsplit(" ", 1)[0] + " ..."
        if block:
            return block
    return ""


def _escape_markdown(text: str) -> str:
    """Show `text` literally in gr.Markdown (labels, card text and error messages are not markup): escapes the
    characters that can start emphasis, code, links or HTML inside a line."""
    return re.sub(r"([\\`*_\[\]<>])", r"\\\1", text)


def load_examples(examples_dir: str | os.PathLike, modalities: tuple[str, ...]) -> list[list[Any]]:
    """Rows of `<examples_dir>/examples.csv` (columns text, image, audio[, label]; file paths relative to the
    folder; empty cells allowed) as gr.Examples values, in the order of the page's inputs, for the model's
    modalities only. At most `MAX_EXAMPLES` rows; rows left with no input for this model are skipped."""
    import csv

    folder = Path(examples_dir).resolve()
    rows = []
    with open(folder / EXAMPLES_FILE, newline="", encoding="utf-8") as file:
        for record in csv.DictReader(file):
            row = []
            for modality in modalities:
                value = (record.get(INPUT_NAMES[modality]) or "").strip() or None
                if value is not None and modality != "text":
                    path = (folder / value).resolve()
                    if not path.is_relative_to(folder):  # the server may serve this folder and nothing else
                        raise ValueError(f"examples: {value!r} lies outside the examples folder {str(folder)!r}")
                    value = str(path)
                row.append(value)
            if any(value is not None for value in row):
                rows.append(row)
            if len(rows) == MAX_EXAMPLES:
                break
    return rows


def default_examples_dir(model_path: str) -> str | None:
    """`<model>/examples` when the model folder ships one (mm-train writes it for the built-in sample)."""
    folder = Path(model_path) / "examples"
    return str(folder) if (folder / EXAMPLES_FILE).is_file() else None


def build_demo(
    model_path: str,
    *,
    trust_remote_code: bool = False,
    examples_dir: str | None = None,
    device: str | None = None,
    max_batch_size: int = 8,
    concurrency_limit: int = 1,
    max_queue_size: int = 64,
    delete_cache: tuple[int, int] = (600, 3600),
    limits: MediaLimits = MediaLimits(),
    quantize: bool = False,
) -> gr.Blocks:
    """Build the page for the mm-fusion classifier at `model_path` (see `load_model`), with its queue set up.

    `examples_dir` holds `examples.csv` (see `load_examples`); by default the model folder's `examples/`.
    Requests run in batches of up to `max_batch_size`, `concurrency_limit` batches at a time, with at most
    `max_queue_size` requests waiting (more are refused with "queue is full"). Every `delete_cache[0]` seconds,
    uploads older than `delete_cache[1]` seconds are deleted; all of them when the server stops. Requests may name
    only files in Gradio's upload folder (uploads, and Gradio's copies of the examples), and media over `limits`
    are refused before decoding. With `quantize`, the model runs on the CPU with dynamic int8 Linears
    (`training.quantize.quantize_for_cpu`). The returned Blocks also carries `examples_dir`, `model` and `processor`.
    """
    model, processor = load_model(model_path, trust_remote_code=trust_remote_code,
                                  device="cpu" if quantize and device is None else device)
    if quantize:
        from training.quantize import quantize_for_cpu

        model = quantize_for_cpu(model)
    config = model.config
    modalities = tuple(m for m in ("vision", "text", "audio") if m in config.modalities)
    sampling_rate = processor.feature_extractor.sampling_rate if processor.feature_extractor is not None else 16_000
    labels = [config.id2label[i] for i in range(config.num_labels)]
    name, description = describe_model(model_path, config)
    examples_dir = examples_dir or default_examples_dir(model_path)
    # where Gradio keeps uploads and its copies of the examples: the only files a request may name
    upload_folder = os.path.realpath(get_upload_folder())

    def predict(image: list | None = None, text: list | None = None, audio: list | None = None) -> tuple[list, ...]:
        """Batched: a list per input the model has (the others stay None); a list per output."""
        start = time.perf_counter()
        columns = {key: values for key, values in (("image", image), ("text", text), ("audio", audio))
                   if values is not None}
        batch_size = len(next(iter(columns.values())))
        decoded: list[Sample | Exception] = []
        for values in zip(*columns.values()):
            given = dict(zip(columns, values))
            try:
                files = {key: _uploaded_path(given.get(key), key, upload_folder) for key in ("image", "audio")}
                decoded.append(decode_sample(**{**given, **files}, sampling_rate=sampling_rate, limits=limits))
            except Exception as err:
                decoded.append(err)
        results = iter(classify(model, processor, [s for s in decoded if isinstance(s, Sample)]))
        outcomes = [next(results) if isinstance(s, Sample) else s for s in decoded]
        latency = f"{(time.perf_counter() - start) * 1000:.0f} ms (decoding and model, batch of {batch_size})"
        probabilities, charts, errors = [], [], []
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                probabilities.append(None)
                charts.append(None)
                errors.append(_error_message(outcome))
            else:
                probabilities.append(outcome["probabilities"])
                charts.append(_contribution_frame(outcome["contributions"]))
                errors.append("")
        return probabilities, charts, [latency] * batch_size, errors

    with gr.Blocks(title=f"{name} · mm-demo", analytics_enabled=False, delete_cache=delete_cache) as demo:
        gr.Markdown(
            f"# {_escape_markdown(name)}\n\n{_escape_markdown(description)}\n\n"
            f"**Labels:** {', '.join(_escape_markdown(label) for label in labels)}  \n"
            f"**Inputs:** {', '.join(INPUT_NAMES[m] for m in modalities)}; each one is optional.",
            elem_id="mm-header",
        )
        with gr.Row():
            with gr.Column():
                inputs = {}  # keyed by predict's parameter names, which the API shows
                if "vision" in modalities:
                    inputs["image"] = gr.Image(
                        label="Image", type="filepath", sources=["upload", "webcam", "clipboard"],
                        height=IMAGE_INPUT_HEIGHT, elem_id="mm-image",
                    )
                if "text" in modalities:
                    inputs["text"] = gr.Textbox(
                        label="Text", lines=2, max_length=MAX_TEXT_CHARACTERS, elem_id="mm-text",
                    )
                if "audio" in modalities:
                    inputs["audio"] = gr.Audio(
                        label="Audio", type="filepath", sources=["upload", "microphone"], elem_id="mm-audio",
                    )
                with gr.Row():
                    clear = gr.ClearButton(list(inputs.values()), value="Clear", elem_id="mm-clear")
                    submit = gr.Button("Classify", variant="primary", elem_id="mm-submit")
            with gr.Column():
                label_output = gr.Label(label="Prediction", num_top_classes=min(10, len(labels)), elem_id="mm-label")
                chart_output = gr.BarPlot(
                    x="input", y="contribution", label="What each input added",
                    y_title="predicted label's probability, minus without this input", sort=None, height=220,
                    elem_id="mm-contributions",
                )
                latency_output = gr.Textbox(label="Latency", interactive=False, elem_id="mm-latency")
                error_output = gr.Markdown(elem_id="mm-error")
        if examples_dir:
            gr.Examples(
                load_examples(examples_dir, modalities), inputs=list(inputs.values()), cache_examples=False,
                label="Examples (click one, then Classify)", examples_per_page=MAX_EXAMPLES,
            )
        clear.add([label_output, chart_output, latency_output, error_output])
        outputs = [label_output, chart_output, latency_output, error_output]
        # preprocess=False: Gradio's own preprocessing would open images with PIL, without our limits, and an
        # exception there fails the whole batch; predict decodes each item itself, from the upload folder only
        event = submit.click(
            predict, inputs_kwargs=inputs, outputs=outputs, api_name="predict", batch=True,
            max_batch_size=max_batch_size, preprocess=False, concurrency_limit=concurrency_limit,
        )
        # queued (a gr.Error outside the queue reaches the page as a bare HTTP 500), but never waiting for a batch
        event.then(_show_error, error_output, None, api_visibility="private", show_progress="hidden",
                   concurrency_limit=None)
    demo.queue(max_size=max_queue_size, default_concurrency_limit=concurrency_limit)
    demo.examples_dir = examples_dir
    demo.model, demo.processor = model, processor
    return demo


def _uploaded_path(value: Any, name: str, upload_folder: str) -> str | None:
    """The path of a file the server received (Gradio sends `{"path": ..., ...}`), or None when there is none.

    Gradio checks the files it knows as files (`meta._type` set) against its upload folder, and not a bare path or
    a dict without `meta`, so this refuses, with a `ValueError`, any path outside `upload_folder`."""
    if value is None:
        return None
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str):
        raise ValueError(f"{name}: expected an uploaded file; got {type(value).__name__} without a file path")
    if os.path.commonpath([os.path.realpath(path), upload_folder]) != upload_folder:
        raise ValueError(f"{name}: not a file uploaded to this server")
    return path


def _contribution_frame(contributions: dict[str, float]):
    import pandas as pd

    return pd.DataFrame({"input": list(contributions), "contribution": list(contributions.values())})


def _error_message(error: Exception) -> str:
    """The error output (Markdown): the message of a refused input, which names the input and the limit; for any
    other failure only its type (the server log has the traceback), so no stack trace reaches the page."""
    if isinstance(error, ValueError):
        return _escape_markdown(str(error))
    logger.error("classification failed", exc_info=error)
    return f"the model failed on this input ({type(error).__name__}); try another input"


def _show_error(message: str) -> None:
    """Also raise the request's error as a gr.Error, which the page shows as an alert (its message is HTML)."""
    if message:
        unescaped = re.sub(r"\\(.)", r"\1", message)
        raise gr.Error(html.escape(unescaped), title="Could not classify", print_exception=False)


# ---- the command line ------------------------------------------------------------------------------------------------


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    environ = os.environ
    parser = argparse.ArgumentParser(prog="mm-demo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default=environ.get("MM_FUSION_MODEL", DEFAULT_MODEL),
                        help="Model folder (merged model or peft adapter) or Hub id. Env: MM_FUSION_MODEL. "
                             f"Default: {DEFAULT_MODEL}, the README's sample model.")
    parser.add_argument("--trust_remote_code", action="store_true",
                        default=_env_flag("MM_FUSION_TRUST_REMOTE_CODE"),
                        help="Run the code a Hub model carries. Env: MM_FUSION_TRUST_REMOTE_CODE=1.")
    parser.add_argument("--examples", default=environ.get("MM_FUSION_EXAMPLES"),
                        help="Examples folder with examples.csv (text, image, audio[, label]; paths relative to it). "
                             "Default: the model folder's examples/. Env: MM_FUSION_EXAMPLES.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... Default: cuda when available.")
    parser.add_argument("--quantize", action="store_true", default=_env_flag("MM_FUSION_QUANTIZE"),
                        help="Run on the CPU with dynamic int8 Linear layers (faster on CPU; see "
                             "benchmarks/cpu_quantized.py). Env: MM_FUSION_QUANTIZE=1.")
    parser.add_argument("--host", default=environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="Address to bind; 0.0.0.0 serves the network. Env: GRADIO_SERVER_NAME.")
    parser.add_argument("--port", type=int, default=int(environ.get("GRADIO_SERVER_PORT", 7860)),
                        help="Port. Env: GRADIO_SERVER_PORT.")
    parser.add_argument("--share", action="store_true", help="Also open a public gradio.live link (off by default).")
    parser.add_argument("--max_file_size", default="20mb", help="Largest upload, e.g. 20mb; larger ones get 413.")
    parser.add_argument("--max_batch_size", type=int, default=8, help="Requests run together in one batch.")
    parser.add_argument("--concurrency_limit", type=int, default=1, help="Batches running at the same time.")
    parser.add_argument("--max_queue_size", type=int, default=64,
                        help="Requests waiting at most; more are refused with 'queue is full'.")
    parser.add_argument("--delete_cache", type=int, nargs=2, default=(600, 3600), metavar=("EVERY", "AGE"),
                        help="Every EVERY seconds delete uploads older than AGE seconds.")
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Gradio reads its upload folder from GRADIO_TEMP_DIR when the page is built: give this server its own, and
    # remove it on the way out (Gradio deletes the uploads, not its copies of the examples or the folders)
    own_temp_dir = None
    if not os.environ.get("GRADIO_TEMP_DIR"):
        own_temp_dir = tempfile.mkdtemp(prefix="mm-demo-")
        os.environ["GRADIO_TEMP_DIR"] = own_temp_dir
    # SIGTERM (docker stop, Spaces) takes Ctrl-C's way out, through Gradio's shutdown
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        demo = build_demo(
            args.model, trust_remote_code=args.trust_remote_code, examples_dir=args.examples, device=args.device,
            max_batch_size=args.max_batch_size, concurrency_limit=args.concurrency_limit,
            max_queue_size=args.max_queue_size, delete_cache=tuple(args.delete_cache), quantize=args.quantize,
        )
        # no allowed_paths: Gradio serves the examples from its own copies in the upload folder
        demo.launch(
            server_name=args.host, server_port=args.port, share=args.share, max_file_size=args.max_file_size,
            show_error=False, enable_monitoring=False, mcp_server=False, ssr_mode=False, css=PAGE_CSS,
        )
    except (OSError, ValueError) as error:  # no model there, not an mm-fusion classifier, the port is taken, ...
        print(f"mm-demo: error: {error}", file=sys.stderr)
        return 2
    finally:
        if own_temp_dir:
            shutil.rmtree(own_temp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
elif os.environ.get("MM_FUSION_MODEL"):
    # hosts that import the app and launch `demo` themselves (`gradio demo/app.py`); the queue limits come with it,
    # the page's CSS does not (Gradio 6 takes CSS in launch() only): such a host passes css=PAGE_CSS
    demo = build_demo(
        os.environ["MM_FUSION_MODEL"],
        trust_remote_code=_env_flag("MM_FUSION_TRUST_REMOTE_CODE"),
        examples_dir=os.environ.get("MM_FUSION_EXAMPLES"),
        quantize=_env_flag("MM_FUSION_QUANTIZE"),
    )
