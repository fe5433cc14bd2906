"""Scoring stage: generation files in, score files out (corpus metrics with bootstrap CIs + per-row tables).

Reads: generation and early-exit files (tunelens.generation, tunelens.probe), the split's test.jsonl, models for
perplexity, BERTScore and the judge, filled human rating sheets. Writes: score files and per-row CSVs (rules
`score`, `score_early_exit`, `perplexity`, `judge`, `human_score`) and the blind rating sheet (`human_sheet`).

Modules (this file imports none of them, so importing one module does not run the others):
- metrics.py     the metric registry (METRICS, Metric, MetricResult, register, scored_metric_names,
                 default_metric_names, check_metric_names) and the text metrics (bleu, rouge_l, bertscore,
                 codebleu, exact_match, length, ...);
- codebleu_stats.py  CodeBLEU as sufficient statistics: per-row counts from codebleu's own helpers and
                 the corpus value from their sums (codebleu_components, codebleu_corpus_value, CODEBLEU_STATS);
- statistics.py  every bootstrap and confidence interval: bootstrap_ci, paired_bootstrap, adjust_p_values,
                 paired_difference, rank_agreement, ... (also read by tunelens.report);
- score.py       score_generation_file, score_rows, score_record, read_generations, read_generation_meta,
                 write_rows_csv, read_rows_csv;
- perplexity.py  run_perplexity_job, reference_perplexity, perplexity_output, write_perplexity;
- judge.py       judge_generation_file, judge_prompt, rate;
- human.py       write_human_sheet, human_scores, read_rating_sheet.
"""
