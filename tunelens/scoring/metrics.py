"""The metric registry: one `Metric` record per metric, read by every stage, and the text metrics' code.

A metric is registered once, here (`register`), with everything any stage needs:
  name            key in config (`scoring.metrics`), score files and summary.csv
  label, decimals how the report shows it
  scale           its scale as score files and summary.csv write it; `scale_label` the report's wording
  higher_is_better  ranking direction (None: not ranked, e.g. length)
  sentence_level  what a per-row value is (the per-row CSV)
  corpus_stats    for corpus-level metrics (not a mean of rows: BLEU, CodeBLEU, perplexity), the per-row
                  CSV's columns of sufficient statistics, and `corpus_reduce` the function turning their
                  column sums into the corpus value. The report's paired differences of such a metric are
                  differences of corpus values, bootstrapped from these columns (not means of per-row values)
  dataset_kinds   the dataset kinds (`dataset.kind`) it applies to; other kinds skip it with a reason
  compute         the function for metrics computed from generation files (tunelens.scoring.score); None for metrics
                  that their own stage writes (perplexity, judge, human)
Readers: scoring (tunelens.scoring.score: compute, skip), config validation (the `scoring.metrics` enum and default,
tunelens.config), the report (labels, scales, ranking, decimals, order; tunelens.report.common) and plots.

Every compute function returns a `MetricResult`:
  - `per_row`: one sentence-level value per row (what the per-row CSV holds, for paired comparisons);
  - `value`: the corpus value (the number tables show);
  - `stats` + `reduce`: for corpus metrics that are not a mean of rows (BLEU, CodeBLEU, perplexity), per-row
    sufficient statistics whose column sums `reduce` turns into the corpus value. The bootstrap resamples rows
    and reduces the resampled sums, so a CI costs one matrix product instead of re-running the library.
    `stats is None` means the corpus value is the mean of `per_row`.

Heavy libraries are imported inside the metric functions, so `import tunelens.scoring.metrics` stays cheap.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tunelens.errors import ConfigError
from tunelens.scoring.codebleu_stats import (CODEBLEU_PER_ROW_NOTE, CODEBLEU_STATS, CODEBLEU_WEIGHTS,
                                             _codebleu_row_stats, _codebleu_tools, codebleu_components,
                                             codebleu_corpus_value)

log = logging.getLogger(__name__)

DATASET_KINDS = ("text", "code")  # values of dataset.kind


@dataclass
class MetricResult:
    """What one metric computed over one generation file."""

    name: str
    per_row: np.ndarray
    value: float
    stats: np.ndarray | None = None
    reduce: Callable[[np.ndarray], float] | None = None
    details: dict = field(default_factory=dict)

    @property
    def scale(self) -> str:
        return METRICS[self.name].scale


@dataclass(frozen=True)
class BertScoreSettings:
    """bert-score options. `model` is a local HF directory or hub id; `num_layers` None = bert-score's
    default for a known model type (a local path needs it). `rescale_with_baseline` needs `baseline_path`
    (CSV LAYER,P,R,F): bert-score ships baselines only for hub model names, and otherwise silently returns
    unrescaled scores."""

    model: str
    num_layers: int | None = None
    batch_size: int = 64
    lang: str = "en"
    rescale_with_baseline: bool = False
    baseline_path: str | None = None


@dataclass(frozen=True)
class ScoringContext:
    """Everything a metric may need besides the text pairs."""

    dataset_kind: str = "text"  # text | code
    code_language: str = "python"
    bertscore: BertScoreSettings | None = None
    device: str = "auto"  # auto | cpu | cuda (bert-score model)

    @classmethod
    def from_dict(cls, values: dict) -> "ScoringContext":
        """From rule params: {"dataset_kind", "code_language", "device", "bertscore": {...} or None}."""
        values = dict(values)
        bertscore = values.pop("bertscore", None)
        return cls(**values, bertscore=BertScoreSettings(**bertscore) if bertscore else None)


@dataclass(frozen=True)
class Metric:
    """Everything every stage knows about one metric (see the module docstring)."""

    name: str
    label: str
    scale: str
    higher_is_better: bool | None
    decimals: int
    sentence_level: str
    description: str
    compute: Callable[[list[str], list[str], list[dict], ScoringContext], MetricResult] | None = None
    dataset_kinds: tuple[str, ...] = DATASET_KINDS
    scale_label: str | None = None  # the report's wording of the scale; None = `scale`
    default: bool = True  # in the default `scoring.metrics` (computed metrics only)
    corpus_stats: tuple[str, ...] = ()  # per-row CSV columns of sufficient statistics (corpus-level metrics)
    corpus_reduce: Callable[[np.ndarray], float] | None = None  # column sums of corpus_stats -> corpus value

    @property
    def corpus_level(self) -> bool:
        """The corpus value is reduced from summed per-row statistics, not the mean of per-row values."""
        return self.corpus_reduce is not None

    @property
    def shown_scale(self) -> str:
        return self.scale_label or self.scale

    @property
    def scored(self) -> bool:
        """Computed from generation files by the score stage (a `scoring.metrics` choice)."""
        return self.compute is not None

    def skip_reason(self, context: ScoringContext) -> str | None:
        """Why this metric does not apply to the study (e.g. CodeBLEU on a text dataset), or None."""
        if context.dataset_kind in self.dataset_kinds:
            return None
        needs = " or ".join(self.dataset_kinds)
        return f"dataset kind is {context.dataset_kind} ({self.label} needs dataset.kind: {needs})"


# In registration order, which is the order of the report's columns and of summary.csv.
METRICS: dict[str, Metric] = {}


def register(name: str, *, label: str, scale: str, higher_is_better: bool | None, decimals: int,
             sentence_level: str, description: str, dataset_kinds: Sequence[str] = DATASET_KINDS,
             scale_label: str | None = None, default: bool = True, compute: Callable | None = None,
             corpus_stats: Sequence[str] = (), corpus_reduce: Callable[[np.ndarray], float] | None = None):
    """Register a metric. As a decorator, the decorated function is its `compute` (a metric of the score
    stage); called with `compute=None` and not used as a decorator, it declares a metric another stage writes.
    A corpus-level metric names its per-row statistics columns (`corpus_stats`, in the order of
    MetricResult.stats) and `corpus_reduce` (column sums -> corpus value). Re-registering a name replaces it."""
    if bool(corpus_stats) != (corpus_reduce is not None):
        raise ValueError(f"metric '{name}': corpus_stats and corpus_reduce go together")
    unknown = sorted(set(dataset_kinds) - set(DATASET_KINDS))
    if unknown:
        raise ValueError(f"metric '{name}': unknown dataset kind(s) {unknown}; known: {list(DATASET_KINDS)}")

    def add(fn: Callable | None) -> Callable | None:
        METRICS[name] = Metric(name, label, scale, higher_is_better, decimals, sentence_level, description,
                               fn, tuple(dataset_kinds), scale_label, default, tuple(corpus_stats), corpus_reduce)
        return fn

    add(compute)
    return add


def scored_metric_names() -> list[str]:
    """Metrics the score stage computes (the choices of `scoring.metrics`), in registry order."""
    return [name for name, metric in METRICS.items() if metric.scored]


def default_metric_names() -> list[str]:
    """The default of `scoring.metrics`."""
    return [name for name, metric in METRICS.items() if metric.scored and metric.default]


def check_metric_names(names: Sequence[str]) -> None:
    choices = scored_metric_names()
    unknown = [name for name in names if name not in choices]
    if unknown:
        raise ConfigError(f"scoring.metrics: unknown metric(s) {unknown}; registered: {sorted(choices)}")


# --------------------------------------------------------------------------------------------- BLEU
def _bleu_reduce(corpus_bleu) -> Callable[[np.ndarray], float]:
    from sacrebleu.metrics.bleu import BLEU

    order = corpus_bleu.max_ngram_order

    def reduce(sums: np.ndarray) -> float:
        sums = np.rint(sums).astype(np.int64)  # counts: exact integers, as sacrebleu sums them
        return BLEU.compute_bleu(
            correct=sums[2 : 2 + order].tolist(), total=sums[2 + order : 2 + 2 * order].tolist(),
            sys_len=int(sums[0]), ref_len=int(sums[1]), smooth_method=corpus_bleu.smooth_method,
            smooth_value=corpus_bleu.smooth_value, effective_order=False, max_ngram_order=order,
        ).score

    return reduce


def bleu_corpus_value(sums: np.ndarray) -> float:
    """Corpus BLEU (0-100, the metric's settings: sacrebleu BLEU() defaults) from summed BLEU_STATS columns."""
    return _default_bleu_reduce()(sums)


@functools.lru_cache(maxsize=1)
def _default_bleu_reduce() -> Callable[[np.ndarray], float]:
    from sacrebleu.metrics.bleu import BLEU

    return _bleu_reduce(BLEU())  # built once: BLEU() costs ~0.2 ms, a paired bootstrap reduces 2,000 times


BLEU_ORDER = 4  # sacrebleu's default max n-gram order (BLEU())
BLEU_STATS = ("bleu.sys_len", "bleu.ref_len", *(f"bleu.correct_{n}" for n in range(1, BLEU_ORDER + 1)),
              *(f"bleu.total_{n}" for n in range(1, BLEU_ORDER + 1)))


@register("bleu", label="BLEU", scale="0-100", higher_is_better=True, decimals=1,
          sentence_level="sacrebleu.sentence_bleu (exp smoothing, effective order)",
          description="sacrebleu corpus BLEU (13a, exp smoothing); per row sacrebleu.sentence_bleu",
          corpus_stats=BLEU_STATS, corpus_reduce=bleu_corpus_value)
def bleu(generated: list[str], references: list[str], rows: list[dict], context: ScoringContext) -> MetricResult:
    """Corpus BLEU from summed n-gram statistics; no n-gram match at all gives exactly 0 (sacrebleu #141),
    and an empty output has brevity penalty 0, so gibberish or empty output cannot score above 0 by smoothing."""
    from sacrebleu.metrics.bleu import BLEU

    corpus_bleu = BLEU()
    # sacrebleu.sentence_bleu's defaults: exp smoothing with effective order (orders without any match
    # are left out), the usual sentence-level variant.
    sentence_bleu = BLEU(effective_order=True)
    per_row, stats = [], []
    for hyp, ref in zip(generated, references):
        score = sentence_bleu.sentence_score(hyp, [ref])
        per_row.append(score.score)
        stats.append([score.sys_len, score.ref_len, *score.counts, *score.totals])
    stats_array = np.asarray(stats, dtype=np.float64)
    value = corpus_bleu.corpus_score(generated, [references]).score
    return MetricResult(
        "bleu", np.asarray(per_row), value, stats=stats_array, reduce=_bleu_reduce(corpus_bleu),
        details={"signature": str(corpus_bleu.get_signature()), "sentence_level": "sacrebleu.sentence_bleu"},
    )


# --------------------------------------------------------------------------------------------- ROUGE-L
@register("rougeL", label="ROUGE-L", scale="0-1", higher_is_better=True, decimals=3,
          sentence_level="ROUGE-L F-measure of the row",
          description="rouge-score ROUGE-L F-measure, Porter stemmer; corpus = mean of rows")
def rouge_l(generated: list[str], references: list[str], rows: list[dict], context: ScoringContext) -> MetricResult:
    """rouge-score's default tokenizer keeps only [a-z0-9] tokens: text in other scripts scores 0 (library behaviour)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    # RougeScorer.score(target, prediction): the reference comes first.
    per_row = np.asarray([scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(generated, references)])
    return MetricResult("rougeL", per_row, float(per_row.mean()), details={"use_stemmer": True})


# --------------------------------------------------------------------------------------------- BERTScore
def load_bertscorer(settings: BertScoreSettings, device: str = "auto"):
    """Build bert-score's scorer once (it loads the model); reuse it for every file of a job."""
    from bert_score import BERTScorer

    from tunelens.models import pick_device

    if settings.rescale_with_baseline and not settings.baseline_path:
        raise ConfigError(
            "scoring.bertscore.rescale_with_baseline: needs scoring.bertscore.baseline_path (CSV LAYER,P,R,F); "
            "without it bert-score would return unrescaled scores for a local model"
        )
    if settings.num_layers is None:
        from bert_score.utils import model2layers

        if str(settings.model) not in model2layers:
            raise ConfigError(
                f"scoring.bertscore.num_layers: needed for model '{settings.model}' (bert-score knows a default "
                "layer only for its listed hub models)"
            )
    if settings.baseline_path and not Path(settings.baseline_path).is_file():
        raise ConfigError(f"scoring.bertscore.baseline_path: '{settings.baseline_path}' does not exist")
    return BERTScorer(
        model_type=str(settings.model), num_layers=settings.num_layers, batch_size=settings.batch_size,
        device=pick_device(device), lang=settings.lang, rescale_with_baseline=settings.rescale_with_baseline,
        baseline_path=settings.baseline_path,
    )


_BERTSCORERS: dict = {}


def _cached_bertscorer(settings: BertScoreSettings, device: str):
    key = (settings, device)
    if key not in _BERTSCORERS:
        _BERTSCORERS.clear()  # one model in memory at a time
        _BERTSCORERS[key] = load_bertscorer(settings, device)
    return _BERTSCORERS[key]


def bertscore_f1(settings: BertScoreSettings, device: str, generated: list[str], references: list[str]) -> dict:
    """bert-score F1 of non-empty pairs with the cached scorer: {"f1": [float per pair], "num_layers", "device",
    "baseline_f1" (the F baseline when rescaling, else None)}. What the metric needs from the scorer, as plain
    values, so that a BERTScore server (tunelens.generation.genserver) can compute it for a score job."""
    scorer = _cached_bertscorer(settings, device)
    f1: list[float] = []
    if generated:
        _, _, values = scorer.score(generated, references, verbose=False, batch_size=settings.batch_size)
        f1 = values.double().cpu().numpy().tolist()
    return {"f1": f1, "num_layers": scorer.num_layers, "device": str(scorer.device),
            "baseline_f1": float(scorer.baseline_vals[2]) if settings.rescale_with_baseline else None}


# Where bertscore_f1 runs: None = in this process. scripts/score.py sets the run's BERTScore server client
# (bertscore_runner), which answers with the same values (falling back to this process).
BERTSCORE_RUNNER: Callable[[BertScoreSettings, str, list[str], list[str]], dict] | None = None


def bertscore_task(job: dict) -> tuple[dict, list[float]]:
    """The server side of bertscore_runner (a request to tunelens.generation.genserver): (meta, F1 per pair)."""
    meta = bertscore_f1(BertScoreSettings(**job["settings"]), job["device"], job["generated"], job["references"])
    rows = meta.pop("f1")
    meta["n_rows"] = len(rows)
    return meta, rows


def bertscore_runner(*, base: str | Path | None = None, start_timeout_s: float = 120.0,
                     request_timeout_s: float = 3600.0, idle_timeout_s: float = 120.0):
    """A BERTSCORE_RUNNER that asks the run's BERTScore server (a generation server process, keyed by the
    BERTScore model, device and thread count) instead of importing bert_score/torch and loading the scorer in
    every score job (28 in the embedded default). The server runs bertscore_f1, so the values are the same
    floats (tests/test_genserver.py); when it cannot serve, the job computes them itself."""

    def run(settings: BertScoreSettings, device: str, generated: list[str], references: list[str]) -> dict:
        import dataclasses
        import sys

        from tunelens.servers import ServerUnavailable, generate_via_server

        job = {"task": "bertscore", "model_path": str(settings.model), "backend": "bertscore", "device": device,
               "gpus": 0, "seed": None, "vllm_options": None, "settings": dataclasses.asdict(settings),
               "generated": list(generated), "references": list(references)}
        try:
            meta, rows = generate_via_server(job, python=sys.executable, base=base, start_timeout_s=start_timeout_s,
                                             request_timeout_s=request_timeout_s, idle_timeout_s=idle_timeout_s,
                                             exclusive_gpu=False)
        except ServerUnavailable as exc:
            log.warning("BERTScore server unavailable (%s); scoring without it", exc)
            return bertscore_f1(settings, device, generated, references)
        return {"f1": rows, "num_layers": meta["num_layers"], "device": meta["device"],
                "server": meta.get("execution"),  # the request's server CPU, billed by the report's costs
                "baseline_f1": meta["baseline_f1"]}

    return run


@register("bertscore", label="BERTScore", scale="0-1", higher_is_better=True, decimals=3,
          sentence_level="bert-score F1 of the row",
          description="bert-score F1 (configurable model); corpus = mean of rows")
def bertscore(generated: list[str], references: list[str], rows: list[dict], context: ScoringContext) -> MetricResult:
    """bert-score F1 per row; an empty output (or reference) scores raw 0, as bert-score defines it."""
    if context.bertscore is None:
        raise ConfigError("metric 'bertscore' needs scoring.bertscore settings (model path)")
    # bert-score means to give a pair with an empty (after strip) side raw P = R = F1 = 0, but its empty-input
    # path calls a tokenizer method transformers 5 removed; score only the non-empty pairs and give the
    # others bert-score's intended value (raw 0, rescaled with the baseline like every other row).
    empty = np.asarray([not hyp.strip() or not ref.strip() for hyp, ref in zip(generated, references)], dtype=bool)
    per_row = np.zeros(len(generated), dtype=np.float64)
    keep = np.flatnonzero(~empty)
    scored = (BERTSCORE_RUNNER or bertscore_f1)(context.bertscore, context.device,
                                                [generated[i] for i in keep], [references[i] for i in keep])
    if context.bertscore.rescale_with_baseline:
        baseline_f1 = scored["baseline_f1"]
        per_row[:] = (0.0 - baseline_f1) / (1.0 - baseline_f1)
    if keep.size:
        per_row[keep] = np.asarray(scored["f1"], dtype=np.float64)
    return MetricResult(
        "bertscore", per_row, float(per_row.mean()),
        details={
            "model": str(context.bertscore.model), "num_layers": scored["num_layers"],
            "rescaled": context.bertscore.rescale_with_baseline, "baseline_path": context.bertscore.baseline_path,
            "device": scored["device"], "empty_pairs": int(empty.sum()),
            # how the BERTScore server served this file (None: computed in the job); the score stage moves it
            # out of the metric's entry into the score file's `metric_servers` (timings are not results)
            "server": scored.get("server"),
        },
    )


# --------------------------------------------------------------------------------------------- CodeBLEU
@register("codebleu", label="CodeBLEU", scale="0-1", higher_is_better=True, decimals=3,
          sentence_level="calc_codebleu on the row alone (a data-flow score of 0 counts as 1)",
          description="codebleu.calc_codebleu (weights 0.25 each)",
          dataset_kinds=("code",), corpus_stats=CODEBLEU_STATS, corpus_reduce=codebleu_corpus_value)
def codebleu(generated: list[str], references: list[str], rows: list[dict], context: ScoringContext) -> MetricResult:
    """Corpus CodeBLEU equal to codebleu.calc_codebleu(references, generated, lang); per row the same on one row."""
    tools = _codebleu_tools(context.code_language)
    stats = np.asarray(
        [_codebleu_row_stats(ref, hyp, tools) for hyp, ref in zip(generated, references)], dtype=np.float64
    )
    per_row = np.asarray([codebleu_components(row)["codebleu"] for row in stats])
    components = codebleu_components(stats.sum(axis=0))
    return MetricResult(
        "codebleu", per_row, components.pop("codebleu"), stats=stats,
        reduce=codebleu_corpus_value,
        details={"language": context.code_language, "weights": list(CODEBLEU_WEIGHTS), "components": components,
                 "per_row_note": CODEBLEU_PER_ROW_NOTE},
    )


# --------------------------------------------------------------------------------------------- simple ones
@register("exact_match", label="Exact match", scale="0-1", higher_is_better=True, decimals=3,
          sentence_level="1 if the stripped texts are equal, else 0",
          description="generated.strip() == reference.strip(); corpus = fraction of rows")
def exact_match(generated: list[str], references: list[str], rows: list[dict], context: ScoringContext) -> MetricResult:
    per_row = np.asarray([float(hyp.strip() == ref.strip()) for hyp, ref in zip(generated, references)])
    return MetricResult("exact_match", per_row, float(per_row.mean()), details={"normalisation": "strip"})


# Written by their own stages (tunelens.scoring.perplexity, tunelens.scoring.judge, tunelens.scoring.human), in the report's order.
def perplexity_corpus_value(sums: np.ndarray) -> float:
    """exp(summed NLL / summed tokens) from the perplexity rows' `nll` and `tokens` columns."""
    return float(np.exp(sums[0] / sums[1])) if sums[1] > 0 else math.nan


register("perplexity", label="Perplexity", scale=">=1 (lower is better)", scale_label=">=1, lower is better",
         higher_is_better=False, decimals=2, sentence_level="exp(NLL / tokens) of the reference",
         description="exp(sum of response-token NLL / response tokens), teacher-forced reference",
         corpus_stats=("nll", "tokens"), corpus_reduce=perplexity_corpus_value)
register("judge", label="Judge", scale="0-1", higher_is_better=True, decimals=3,
         sentence_level="(judge rating 1-5 - 1) / 4", description="LLM judge rating, rescaled to 0-1; corpus = mean")
register("human", label="Human", scale="0-1", higher_is_better=True, decimals=3,
         sentence_level="rater's 1/0 correct", description="share of answers a human rated correct")


@register("length", label="Length", scale="tokens", scale_label="generated tokens", higher_is_better=None,
          decimals=1, sentence_level="generated tokens of the row",
          description="generated tokens per row (num_generated_tokens); corpus = mean")
def length(generated: list[str], references: list[str], rows: list[dict], context: ScoringContext) -> MetricResult:
    per_row = np.asarray([float(row["num_generated_tokens"]) for row in rows])
    return MetricResult("length", per_row, float(per_row.mean()), details={"unit": "model tokens"})
