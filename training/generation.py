"""Generated text over data rows, and its scores: the one place where rows become generated strings
(`generate_texts`, `generate_subsets`; mm-eval's generation report and mm-train's validation call them), and the one
definition of the generation metrics (`generation_metrics`, `generation_intervals`, `RowScores`).

    >>> from training.data import DataSettings
    >>> from training.generation import generate_texts, generation_metrics
    >>> columns = DataSettings(task="generation", prompt_column="question", target_column="answer")
    >>> predictions = generate_texts(model, processor, rows, columns, max_new_tokens=16)  # doctest: +SKIP
    >>> generation_metrics(predictions, [row["answer"] for row in rows])  # doctest: +SKIP
    {'bleu': 41.2, 'chrf': 63.0, 'rouge_l': 0.71, 'exact_match': 0.55}

Conventions:

- A row's modalities are the non-empty cells of `columns.text_column`/`image_column`/`audio_column` that the model
  has a tower for (paths, bytes or decoded media, as `training.data.MMFusionCollator` reads them); its prompt is
  `training.data.prompt_of(row[columns.prompt_column])` (none without a prompt column).
- Modalities outside `keep` are withheld through the `has_*` masks (`training.scoring.withhold`), never by
  zero-filling: their towers do not run and the fusion does not see them. A row left with no modality has nothing to
  condition on: it gets no forward pass and the empty string "" as its generation (which scores as wrong; count
  such rows with `rows_without_modality`).
- Decoding is deterministic: greedy (`num_beams=1`) or beam search, `do_sample=False` whatever the model's
  `generation_config` says, so two runs give the same strings. The towers run once per batch (`encode_towers`),
  however many modality subsets are generated from it.
- Metrics: corpus BLEU and chrF with sacrebleu's defaults (`BLEU()`: 13a tokenisation, exponential smoothing;
  `CHRF()`: character 6-grams, beta 2), on sacrebleu's 0-100 scale; ROUGE-L: the mean over rows of rouge-score's
  `RougeScorer(["rougeL"])` F-measure (no stemming; its tokeniser lowercases and keeps only ASCII letters and
  digits, so a text in another script scores 0); exact match: the share of rows whose prediction equals the reference
  after `normalize_answer`. ROUGE-L and exact match are on a 0-1 scale. One reference per row.
- Confidence intervals: percentile bootstrap over rows (`training.metrics.bootstrap_intervals`). BLEU and chrF are
  recomputed at corpus level on every resample, from the summed per-row n-gram statistics (what sacrebleu's own
  bootstrap does), so a resample's score is exactly `corpus_score` on those rows.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from modeling_mm.configuration_mm import MODALITY_NAMES
from training.data import DataSettings, MMFusionCollator, prompt_of
from training.embeddings import model_modality
from training.metrics import bootstrap_intervals
from training.scoring import _model_device_and_dtype, _to_model, encode_towers, eval_mode, presence, withhold

GENERATION_METRICS = ("bleu", "chrf", "rouge_l", "exact_match")
ALL_MODALITIES = ("vision", "text", "audio")

Rows = Sequence[dict[str, Any]] | datasets.Dataset


# ---- the model behind wrappers -------------------------------------------------------------------------------------

def generation_model(model: torch.nn.Module) -> torch.nn.Module:
    """The `MMFusionForConditionalGeneration` inside `model` (a PeftModel, DDP or Accelerate wrapper may wrap it),
    found by what it has (a decoder config and `generate`), so a class loaded with `trust_remote_code` is found too.
    Raises `ValueError` naming `model` for any other model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "module", base)  # DDP
    if getattr(getattr(base, "config", None), "decoder_config", None) is None or not hasattr(base, "generate"):
        raise ValueError(f"model: {type(base).__name__} generates no text; generation needs an "
                         "MMFusionForConditionalGeneration (mm-train --task generation)")
    return base


def is_generation(model: torch.nn.Module) -> bool:
    """Whether `model` (maybe wrapped) is a generation model (`generation_model` finds one)."""
    try:
        generation_model(model)
    except ValueError:
        return False
    return True


# ---- rows -> generated strings -------------------------------------------------------------------------------------

def _row_list(rows: Rows, start: int, stop: int) -> list[dict[str, Any]]:
    if isinstance(rows, datasets.Dataset):
        columns = rows[start:stop]  # one Arrow read for the batch: {column: values}
        return [dict(zip(columns, values)) for values in zip(*columns.values())]
    return [dict(row) for row in rows[start:stop]]


def _keep_names(keep: Sequence[str], argument: str = "keep") -> tuple[str, ...]:
    """`keep` in the model's stream names ("image" -> "vision"), in MODALITY_NAMES order; refuses unknown names."""
    try:
        names = {model_modality(m) for m in keep}
    except ValueError as error:
        raise ValueError(f"{argument}: {error}") from None
    return tuple(m for m in ALL_MODALITIES if m in names)


def _row_modalities(reader: MMFusionCollator, rows: list[dict[str, Any]]) -> tuple[dict[str, list], np.ndarray]:
    """The processor inputs of `rows` (`MMFusionCollator.inputs`) and their presence, bool (rows, 3) in
    ALL_MODALITIES order: the cells the processor would read."""
    inputs = reader.inputs(rows)
    given = np.zeros((len(rows), len(ALL_MODALITIES)), dtype=bool)
    for j, modality in enumerate(ALL_MODALITIES):
        values = inputs.get(MODALITY_NAMES[modality].processor_argument)
        if values is not None:
            given[:, j] = [value is not None for value in values]
    return inputs, given


def row_modalities(processor, rows: Rows, columns: DataSettings) -> dict[str, np.ndarray]:
    """Which rows have which modality: {"vision"/"text"/"audio": bool (rows,)}, for each modality `processor` reads,
    from the non-empty cells of `columns`' media columns. Reads only the cells; nothing is decoded."""
    reader = MMFusionCollator(processor, columns, [], multi_task=True)
    _, given = _row_modalities(reader, _row_list(rows, 0, len(rows)))
    return {m: given[:, j] for j, m in enumerate(ALL_MODALITIES) if m in reader.model_modalities}


def rows_without_modality(processor, rows: Rows, columns: DataSettings,
                          keep: Sequence[str] = ALL_MODALITIES) -> list[int]:
    """Indices of the `rows` that have none of the modalities in `keep` (among those `processor` reads): the rows that
    `generate_texts` answers with "" (no forward pass). Reads only the cells; nothing is decoded."""
    kept = _keep_names(keep)
    given = row_modalities(processor, rows, columns)
    has_any = np.zeros(len(rows), dtype=bool)
    for modality in kept:
        if modality in given:
            has_any |= given[modality]
    return np.flatnonzero(~has_any).tolist()


@torch.no_grad()
def generate_subsets(model: torch.nn.Module, processor, rows: Rows, columns: DataSettings,
                     subsets: Sequence[Sequence[str]], batch_size: int = 16, max_new_tokens: int = 32,
                     num_beams: int = 1, progress: bool = False) -> dict[tuple[str, ...], list[str]]:
    """For each modality subset in `subsets`, one generated string per row of `rows`, in row order:
    `{tuple(subset) as given: strings}`. Each batch is processed once and each tower runs once on it; every subset
    then generates from it with the other modalities withheld (see the module docstring for rows, prompts,
    withholding and decoding). `generate_texts` is the one-subset form.

    `rows` are dicts or a `datasets.Dataset` with the columns named by `columns` (media cells as paths or bytes,
    relative paths already resolved as `training.data.load_table` does). Runs in eval mode (restored afterwards)
    without gradients, on the model's device and in its dtype. Raises `ValueError` naming the argument for a model
    that generates no text, an unknown modality, `batch_size`, `max_new_tokens` or `num_beams` below 1, and, from the
    processor, naming the row's index within its batch, for a cell it refuses (a corrupt or oversized file)."""
    base = generation_model(model)
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens), ("num_beams", num_beams)):
        if value < 1:
            raise ValueError(f"{name}: must be >= 1; got {value}")
    names = {tuple(subset): _keep_names(subset, "subsets") for subset in subsets}
    if not names or not all(names.values()):
        raise ValueError(f"subsets: expected one or more non-empty modality subsets; got {list(subsets)}")
    modalities = tuple(base.model.modalities)
    # a modality the model has no tower for conditions nothing: a subset of only such modalities gives "" everywhere
    wanted = {key: tuple(m for m in subset if m in modalities) for key, subset in names.items()}
    towers = tuple(m for m in modalities if any(m in subset for subset in wanted.values()))
    reader = MMFusionCollator(processor, columns, [], multi_task=True)
    device, dtype = _model_device_and_dtype(base)
    results: dict[tuple[str, ...], list[str]] = {key: [""] * len(rows) for key in wanted}
    starts = range(0, len(rows), batch_size)
    with eval_mode(base):
        for start in tqdm(starts, desc="generating", leave=False, disable=not progress):
            batch_rows = _row_list(rows, start, start + batch_size)
            inputs, given = _row_modalities(reader, batch_rows)
            given = given[:, [ALL_MODALITIES.index(m) for m in towers]]
            usable = np.flatnonzero(given.any(1))  # rows with nothing to condition on get "" and no forward pass
            if not len(usable):
                continue
            prompts = [prompt_of(row.get(columns.prompt_column)) if columns.prompt_column else None
                       for row in batch_rows]
            # a modality that no subset keeps is not even decoded: it would be withheld from every generation
            read = {MODALITY_NAMES[m].processor_argument for m in towers}
            batch = dict(processor(**{key: [values[i] for i in usable] for key, values in inputs.items()
                                      if key in read}, prompt=[prompts[i] for i in usable]))
            states = encode_towers(base, batch, towers)
            for key, subset in wanted.items():
                texts = _generate_kept(base, processor, batch, states, subset, device, dtype,
                                       max_new_tokens=max_new_tokens, num_beams=num_beams)
                for i, text in zip(usable, texts):
                    if text is not None:
                        results[key][start + int(i)] = text
    return results


def _generate_kept(model: torch.nn.Module, processor, batch: dict[str, torch.Tensor], states: dict,
                   keep: tuple[str, ...], device: torch.device, dtype: torch.dtype | None,
                   **generate_kwargs: Any) -> list[str | None]:
    """The strings generated for `batch` with only `keep`'s modalities (None for a row left with none): the rows that
    keep one are sliced out, their towers' `states` stand in for the raw inputs of those modalities."""
    batch = withhold(batch, keep)
    kept = torch.stack(list(presence(batch).values()), 1).any(1)  # (batch,) bool
    texts: list[str | None] = [None] * len(kept)
    if not bool(kept.any()):
        return texts
    states = {m: value for m, value in states.items() if m in keep}
    replaced = {name for m in states for name in MODALITY_NAMES[m].inputs}
    inputs = {key: _to_model(value[kept], device, dtype) for key, value in batch.items()
              if key not in replaced and value is not None}
    tower_states = {m: (s[kept.to(s.device)], mask[kept.to(mask.device)]) for m, (s, mask) in states.items()}
    ids = model.generate(**inputs, tower_states=tower_states or None, do_sample=False, **generate_kwargs)
    for i, text in zip(kept.nonzero().flatten().tolist(), processor.batch_decode(ids)):
        texts[i] = text
    return texts


def generate_texts(model: torch.nn.Module, processor, rows: Rows, columns: DataSettings,
                   keep: Sequence[str] = ALL_MODALITIES, batch_size: int = 16, max_new_tokens: int = 32,
                   num_beams: int = 1, progress: bool = False) -> list[str]:
    """One generated string per row of `rows`, in order, from the modalities in `keep` (the model's stream names
    "vision", "text", "audio"; "image" is accepted for "vision"), the others withheld through the `has_*` masks; a row
    left with no modality gets "" (`rows_without_modality` lists them). Prompts come from `columns.prompt_column`
    through `prompt_of`. Greedy or beam search (`num_beams`), at most `max_new_tokens` new tokens, special tokens
    skipped (`processor.batch_decode`); a tqdm bar with `progress`. Raises `ValueError` naming `keep` for an empty
    or unknown modality, and see `generate_subsets` for the rest."""
    if not _keep_names(keep):
        raise ValueError(f"keep: expected at least one modality of {', '.join(ALL_MODALITIES)}; got {tuple(keep)}")
    return next(iter(generate_subsets(model, processor, rows, columns, [keep], batch_size, max_new_tokens, num_beams,
                                      progress).values()))


# ---- metrics ---------------------------------------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """The form exact match compares: lowercased, whitespace collapsed to single spaces and stripped, and trailing
    punctuation (any Unicode punctuation character, e.g. "." "!" "?" "…") removed, then stripped again:
    "  A red   Circle. " -> "a red circle". Articles and inner punctuation stay ("a circle" != "circle")."""
    text = re.sub(r"\s+", " ", text.lower()).strip()
    end = len(text)
    while end and unicodedata.category(text[end - 1]).startswith("P"):
        end -= 1
    return text[:end].strip()


def _sacrebleu_metrics():
    from sacrebleu.metrics import BLEU, CHRF

    return BLEU(), CHRF()


def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


@dataclass(frozen=True)
class RowScores:
    """Per-row statistics of every generation metric, computed once, so that any subset or resample of the rows is
    scored without tokenising again: sacrebleu's segment statistics of BLEU and chrF (n-gram matches and totals,
    summed over rows and turned into the corpus score as `corpus_score` does), and each row's ROUGE-L F-measure and
    exact match. `RowScores.of(predictions, references)` builds it; `metrics(rows)` and `intervals(rows, ...)` score
    it."""

    bleu: np.ndarray  # (rows, 2 + 2 * max n-gram order): hypothesis length, reference length, matches, totals
    chrf: np.ndarray  # (rows, 3 * (character order + word order)): per n-gram order, hypothesis, reference, matches
    rouge_l: np.ndarray  # (rows,) float64 in [0, 1]
    exact_match: np.ndarray  # (rows,) float64, 0 or 1

    @classmethod
    def of(cls, predictions: Sequence[str], references: Sequence[str]) -> RowScores:
        """The statistics of each (prediction, reference) pair. Raises `ValueError` naming `references` when the two
        differ in length, and naming the argument and index for an entry that is not a str."""
        predictions, references = list(predictions), list(references)
        if len(predictions) != len(references):
            raise ValueError(f"references: {len(references)} references for {len(predictions)} predictions; pass one "
                             "per prediction")
        for name, texts in (("predictions", predictions), ("references", references)):
            bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
            if bad is not None:
                raise ValueError(f"{name}[{bad}]: expected a str; got {type(texts[bad]).__name__}")
        bleu, chrf = _sacrebleu_metrics()
        scorer = _rouge_scorer()
        width = {"bleu": 2 + 2 * bleu.max_ngram_order, "chrf": 3 * (chrf.char_order + chrf.word_order)}

        def statistics(metric, name):  # sacrebleu's own per-segment statistics, as its bootstrap uses them
            if not predictions:
                return np.zeros((0, width[name]))
            return np.asarray(metric._extract_corpus_statistics(predictions, [references]), dtype=np.float64)

        return cls(
            bleu=statistics(bleu, "bleu"),
            chrf=statistics(chrf, "chrf"),
            rouge_l=np.array([scorer.score(reference, prediction)["rougeL"].fmeasure
                              for prediction, reference in zip(predictions, references)], dtype=np.float64),
            exact_match=np.array([normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)],
                                 dtype=np.float64),
        )

    def __len__(self) -> int:
        return len(self.exact_match)

    def select(self, rows: Sequence[int] | np.ndarray) -> RowScores:
        """The statistics of `rows` only (indices), e.g. one group's."""
        rows = np.asarray(rows, dtype=np.int64)
        return RowScores(self.bleu[rows], self.chrf[rows], self.rouge_l[rows], self.exact_match[rows])

    def statistics(self) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
        """{metric: statistic(indices)} in the vectorised form `training.metrics.bootstrap_intervals` takes: `indices`
        (..., rows) -> the metric of each resample, shape `indices.shape[:-1]`."""
        bleu, chrf = _sacrebleu_metrics()

        def corpus(metric, table):
            def statistic(indices: np.ndarray) -> np.ndarray:
                flat = indices.reshape(-1, indices.shape[-1])  # (resamples, rows)
                totals = table[flat].sum(1)  # (resamples, statistics): each resample's corpus statistics
                return np.array([metric._compute_score_from_stats(t).score for t in totals]).reshape(indices.shape[:-1])
            return statistic

        return {"bleu": corpus(bleu, self.bleu), "chrf": corpus(chrf, self.chrf),
                "rouge_l": lambda i: self.rouge_l[i].mean(-1), "exact_match": lambda i: self.exact_match[i].mean(-1)}

    def metrics(self) -> dict[str, float | None]:
        """BLEU, chrF (corpus level, 0-100), ROUGE-L and exact match (means, 0-1) of all the rows; None for none."""
        if not len(self):
            return {name: None for name in GENERATION_METRICS}
        every_row = np.arange(len(self))
        return {name: float(statistic(every_row)) for name, statistic in self.statistics().items()}

    def intervals(self, rounds: int = 1000, seed: int = 0, confidence_level: float = 0.95
                  ) -> dict[str, list[float] | None]:
        """Percentile bootstrap intervals of each metric over resampled rows (`bootstrap_intervals`); None per metric
        for fewer than 2 rows or 0 rounds. Resamples are drawn in batches that keep the summed statistics small."""
        width = self.chrf.shape[1] if len(self) else 1
        batch = max(1, min(rounds, 2**22 // max(1, len(self) * width)))  # at most ~32 MB of gathered statistics
        return bootstrap_intervals(self.statistics(), len(self), rounds, seed, confidence_level, batch=batch)


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | None]:
    """{"bleu", "chrf", "rouge_l", "exact_match"} of `predictions` against one reference each: corpus BLEU and chrF
    with sacrebleu's defaults (0-100, equal to `BLEU().corpus_score(predictions, [references]).score` and CHRF's),
    the mean ROUGE-L F-measure of rouge-score (0-1) and the share of exact matches after `normalize_answer` (0-1).
    All None for no predictions. Raises `ValueError` naming `references` for a length mismatch."""
    return RowScores.of(predictions, references).metrics()


def generation_intervals(predictions: Sequence[str], references: Sequence[str], rounds: int = 1000, seed: int = 0,
                         confidence_level: float = 0.95) -> dict[str, list[float] | None]:
    """Bootstrap confidence intervals ([low, high], or None) of each of `generation_metrics` over resampled rows:
    percentile method, `rounds` resamples, seeded; BLEU and chrF recomputed at corpus level on each resample."""
    return RowScores.of(predictions, references).intervals(rounds, seed, confidence_level)


def metric_definitions() -> dict[str, str]:
    """How each metric is computed, with sacrebleu's signatures, for a report."""
    bleu, chrf = _sacrebleu_metrics()
    bleu.num_refs = chrf.num_refs = 1  # the signature reads it; set by scoring otherwise
    return {
        "bleu": f"corpus BLEU, 0-100 ({bleu.get_signature().format()})",
        "chrf": f"corpus chrF, 0-100 ({chrf.get_signature().format()})",
        "rouge_l": "mean over rows of the ROUGE-L F-measure of rouge-score's RougeScorer(['rougeL'], "
                   "use_stemmer=False), 0-1",
        "exact_match": "share of rows whose prediction equals the reference after lowercasing, collapsing whitespace, "
                       "stripping, and removing trailing punctuation, 0-1",
    }
