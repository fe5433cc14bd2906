"""CodeBLEU's sufficient statistics: per-row counts computed with codebleu's own helpers, and the corpus value
(codebleu.calc_codebleu) from their column sums, so a bootstrap resamples rows without re-running the library.

The registered metric (`codebleu` in tunelens.scoring.metrics) computes its rows and its value with these.
"""

from __future__ import annotations

import math

import numpy as np

from tunelens.errors import ConfigError


CODEBLEU_WEIGHTS = (0.25, 0.25, 0.25, 0.25)
_NGRAM = 4
# Column layout of the per-row CodeBLEU statistics.
_NG_NUM, _NG_DEN = slice(0, 4), slice(4, 8)
_W_NUM, _W_DEN = slice(8, 12), slice(12, 16)
_HYP_LEN, _REF_LEN, _SYN_MATCH, _SYN_TOTAL, _DF_MATCH, _DF_TOTAL, _W_REF_LEN = range(16, 23)


def _codebleu_tools(lang: str) -> dict:
    from codebleu import codebleu as codebleu_module
    from codebleu.dataflow_match import dfg_function
    from codebleu.utils import AVAILABLE_LANGS, get_tree_sitter_language
    from tree_sitter import Parser

    if lang not in AVAILABLE_LANGS:
        raise ConfigError(f"dataset.code_language: '{lang}' is not supported by codebleu; choices: {AVAILABLE_LANGS}")
    try:
        language = get_tree_sitter_language(lang)
    except Exception as exc:  # a missing or incompatible grammar package
        raise ConfigError(
            f"dataset.code_language '{lang}': cannot load its tree-sitter grammar ({type(exc).__name__}: {exc}); "
            "install the pinned grammar (tree-sitter-python==0.21.0 works with codebleu 0.7.0)"
        ) from None
    parser = Parser()
    parser.language = language
    keywords_file = codebleu_module.PACKAGE_DIR / "keywords" / f"{lang}.txt"
    keywords = [line.strip() for line in keywords_file.read_text(encoding="utf-8").splitlines()]
    return {"parser": parser, "dfg": [parser, dfg_function[lang]], "keywords": keywords, "lang": lang}


def _sub_tree_sexps(root_node) -> list[str]:
    """codebleu.syntax_match's subtree enumeration: the root and every node that has children."""
    stack, out = [root_node], []
    while stack:
        node = stack.pop()
        out.append(str(node))
        stack.extend(child for child in node.children if len(child.children) != 0)
    return out


def _codebleu_row_stats(reference: str, prediction: str, tools: dict) -> list[float]:
    """Sufficient statistics of one row for codebleu.calc_codebleu's four corpus components, computed with
    codebleu's own helpers and in its order (tests check the reduced value equals calc_codebleu)."""
    from codebleu import bleu as ngram_bleu, weighted_ngram_match
    from codebleu.dataflow_match import get_data_flow, normalize_dataflow
    from codebleu.parser import remove_comments_and_docstrings

    lang = tools["lang"]
    reference, prediction = reference.strip(), prediction.strip()
    hyp_tokens, ref_tokens = prediction.split(), reference.split()
    weights = {token: 1 if token in tools["keywords"] else 0.2 for token in ref_tokens}
    ng = [ngram_bleu.modified_precision([ref_tokens], hyp_tokens, n) for n in range(1, _NGRAM + 1)]
    wng = [weighted_ngram_match.modified_recall([[ref_tokens, weights]], hyp_tokens, n) for n in range(1, _NGRAM + 1)]

    try:
        cand_code = remove_comments_and_docstrings(prediction, lang)
    except Exception:  # codebleu ignores unparsable code the same way
        cand_code = prediction
    try:
        ref_code = remove_comments_and_docstrings(reference, lang)
    except Exception:
        ref_code = reference
    cand_sexps = _sub_tree_sexps(tools["parser"].parse(bytes(cand_code, "utf8")).root_node)
    ref_sexps = _sub_tree_sexps(tools["parser"].parse(bytes(ref_code, "utf8")).root_node)
    syntax_match = sum(1 for sexp in ref_sexps if sexp in cand_sexps)

    cand_dfg = normalize_dataflow(get_data_flow(cand_code, tools["dfg"]))
    ref_dfg = normalize_dataflow(get_data_flow(ref_code, tools["dfg"]))
    dataflow_match = 0
    for item in ref_dfg:
        if item in cand_dfg:
            dataflow_match += 1
            cand_dfg.remove(item)

    return [
        *(num for num, _ in ng), *(den for _, den in ng), *(num for num, _ in wng), *(den for _, den in wng),
        len(hyp_tokens), len(ref_tokens), syntax_match, len(ref_sexps), dataflow_match, len(ref_dfg),
        # codebleu's weighted n-gram match takes the closest length over [tokens, weights] pairs, i.e. 2 per
        # row, not the reference length; reproduced through its own function so the values match.
        weighted_ngram_match.closest_ref_length([[ref_tokens, weights]], len(hyp_tokens)),
    ]


def _nltk_style_corpus_bleu(numerators, denominators, hyp_len: float, ref_len: float) -> float:
    """codebleu.bleu.corpus_bleu from summed counts (method1 smoothing, uniform weights)."""
    from codebleu.bleu import SmoothingFunction, brevity_penalty

    if numerators[0] == 0:
        return 0.0
    p_n = SmoothingFunction().method1(list(zip(numerators, denominators)))
    return brevity_penalty(ref_len, hyp_len) * math.exp(math.fsum(0.25 * math.log(n / d) for n, d in p_n))


def codebleu_components(sums: np.ndarray) -> dict[str, float]:
    """calc_codebleu's output from summed per-row statistics."""
    ngram = _nltk_style_corpus_bleu(sums[_NG_NUM], sums[_NG_DEN], sums[_HYP_LEN], sums[_REF_LEN])
    weighted = _nltk_style_corpus_bleu(sums[_W_NUM], sums[_W_DEN], sums[_HYP_LEN], sums[_W_REF_LEN])
    syntax = sums[_SYN_MATCH] / sums[_SYN_TOTAL]
    dataflow = sums[_DF_MATCH] / sums[_DF_TOTAL] if sums[_DF_TOTAL] > 0 else 0.0
    alpha, beta, gamma, theta = CODEBLEU_WEIGHTS
    # codebleu's `dataflow_match_score or 1`: a dataflow score of 0 counts as 1. Kept so values match the
    # library; it means an empty or unrelated output still gets 0.25 (see docs/scoring.md).
    value = alpha * ngram + beta * weighted + gamma * syntax + theta * (dataflow or 1)
    return {
        "codebleu": float(value), "ngram_match_score": float(ngram), "weighted_ngram_match_score": float(weighted),
        "syntax_match_score": float(syntax), "dataflow_match_score": float(dataflow),
    }


def codebleu_corpus_value(sums: np.ndarray) -> float:
    """Corpus CodeBLEU (0-1) from summed CODEBLEU_STATS columns."""
    return codebleu_components(sums)["codebleu"]


CODEBLEU_STATS = (
    *(f"codebleu.ngram_match_{n}" for n in range(1, _NGRAM + 1)), *(f"codebleu.ngram_total_{n}" for n in range(1, _NGRAM + 1)),
    *(f"codebleu.weighted_match_{n}" for n in range(1, _NGRAM + 1)),
    *(f"codebleu.weighted_total_{n}" for n in range(1, _NGRAM + 1)),
    "codebleu.hyp_len", "codebleu.ref_len", "codebleu.syntax_match", "codebleu.syntax_total",
    "codebleu.dataflow_match", "codebleu.dataflow_total", "codebleu.weighted_ref_len",
)
# Per row, codebleu's `dataflow_match_score or 1` gives a row without any data-flow match a free 0.25 (a
# bare "0" against any program scores 0.25 with every component 0), so the per-row mean can move against the
# corpus value; the report's paired differences use the corpus value (CODEBLEU_STATS), never this mean.
CODEBLEU_PER_ROW_NOTE = ("per-row CodeBLEU is calc_codebleu on the row alone: a row whose data-flow match is 0 "
                         "gets 0.25 for it (codebleu's `dataflow_match_score or 1`), so the mean of rows is not "
                         "the corpus value and can move the other way")
