"""Probe stage: per-layer views of a (model, variant) on the test prompts, the logit lens and early exit.

Reads: the split's test.jsonl, a model directory and optionally a LoRA adapter. Writes: the logit-lens JSON with
its heatmap and entropy plots (rule `logit_lens`) and early-exit generation files with their meta (rule
`early_exit`, scored by tunelens.scoring like any generation file).

Modules (this file imports none of them, so importing one module does not run the others):
- probe.py  check_probe_layers, truncated_decoder, early_exit_output, write_early_exit, run_early_exit;
- lens.py   run_logit_lens_job, run_logit_lens, logit_lens, lens_log_probs, logit_lens_output, write_logit_lens,
            encode_prompts (imported by name only by the generation server);
- plots.py  plot_lens_heatmap, plot_lens_entropy.
"""
