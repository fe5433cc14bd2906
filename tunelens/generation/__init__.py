"""Generation stage: a (model, variant, decoding config) and the test prompts in, a generation file out.

Reads: the split's test.jsonl, a model directory and optionally a LoRA adapter (from tunelens.training).
Writes: the generation file (one completion per test row) and its sidecar meta (rule `generate`), the hf-vs-vLLM
agreement report (rule `generation_agreement`); per-model generation servers also answer the perplexity,
logit-lens and early-exit jobs (served.py).

Modules (this file imports none of them, so importing one module does not run the others):
- decoding.py      DecodingConfig (every decoding parameter), knob, knobs, knob_names, schema_properties,
                   sweep_schema_properties, check, hf_generation_kwargs, vllm_sampling_kwargs;
- completions.py   GenerationSettings, Completion, as_decoding_config, describe_semantics, load_prompt_rows,
                   check_context_room, cut_at_stop;
- backend_hf.py    hf_generation_config, hf_generate_batched, plan_batches, auto_token_budget, ...;
- graphs.py        decode_graphs (DecodeGraphs: a model's StaticCaches and captured decoding steps), held_bytes,
                   release;
- backend_vllm.py  vllm_importable, vllm_usable, resolve_backend, build_vllm_engine, vllm_generate;
- generate.py      generate, run_completions, generation_output, write_generation, adapter_record, check_variant;
- genserver.py     run_generation_job, run_early_exit_job, job_python, serve, once, main
                   (`python -m tunelens.generation.genserver`);
- server_state.py  _Server (a server's loaded model or engine and its requests), Declined;
- served.py        run_model_task (a perplexity or logit-lens job as a request to its model's server);
- agreement.py     agreement, token_agreement, completions_request, main
                   (`python -m tunelens.generation.agreement`).
"""
