"""Benchmark of the scoring stage: rows/s per metric, bootstrap cost, perplexity and judge throughput.

    # CPU, real pairs (code_alpaca outputs scored against other rows' outputs), SmolLM2 for perplexity/judge:
    OMP_NUM_THREADS=2 python bench/bench_score.py --data /work/shared/data/code_alpaca_2k.json --rows 500 \
        --model /tmp/mat/smollm2-135m-instruct --bert-dir results/models/bertscore --lm-rows 32
    # GPU, synthetic text, random-weight models of real shapes (no download):
    python bench/bench_score.py --device cuda --rows 2000 --random-lm llama2-7b --tokenizer DIR \
        --random-bert bert-large --bert-tokenizer DIR --lm-rows 256

Text metrics run through tunelens.scoring.metrics (the code the score rule runs) on --rows pairs; BERTScore time
excludes the model load (a warm-up call on 8 rows loads it). "bootstrap" is tunelens.scoring.score.summarise with
1000 resamples over the BLEU and CodeBLEU statistics. Perplexity is tunelens.scoring.perplexity.response_nll over
--lm-rows Alpaca-format rows; the judge is tunelens.scoring.judge.rate over the same number of rubric prompts.
Random weights give the speed of a model's shape, not its values. Prints a Markdown table; --json writes it.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

WORDS = (
    "the a model returns list value function each number string of to in for is with data file write print "
    "sum loop index result input output python code example given array sort key dictionary class method "
    "object call test error line check if else while return true false none import from def self"
).split()


def synthetic_pairs(rows: int, seed: int = 0) -> list[tuple[str, str]]:
    """Word salads of 10-80 words (about the length of Alpaca answers); about half the words shared."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(rows):
        reference = [rng.choice(WORDS) for _ in range(rng.randint(10, 80))]
        generated = [w if rng.random() < 0.5 else rng.choice(WORDS) for w in reference[: rng.randint(5, len(reference))]]
        pairs.append((" ".join(generated), " ".join(reference)))
    return pairs


def real_pairs(path: str, rows: int) -> list[tuple[str, str]]:
    """Each row's output scored against the next row's output: real text, partial overlap, code included."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    outputs = [row["output"] for row in data][: rows + 1]
    return [(outputs[i + 1], outputs[i]) for i in range(min(rows, len(outputs) - 1))]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def bench_text_metrics(args, pairs, results):
    from tunelens.scoring.metrics import METRICS, BertScoreSettings, ScoringContext
    from tunelens.scoring.score import summarise

    generated = [g for g, _ in pairs]
    references = [r for _, r in pairs]
    rows = [{"num_generated_tokens": len(g.split())} for g in generated]
    bert = None
    if args.bert_dir:
        bert = BertScoreSettings(model=args.bert_dir, num_layers=args.bert_layers, batch_size=args.bert_batch)
    context = ScoringContext(dataset_kind="code", code_language="python", bertscore=bert, device=args.device)
    computed = {}
    for name in args.metrics:
        if name == "bertscore" and bert is None:
            continue
        try:
            if name == "bertscore":  # load the model outside the timing (once per job in the pipeline)
                METRICS[name].compute(generated[:8], references[:8], rows[:8], context)
            result, seconds = timed(METRICS[name].compute, generated, references, rows, context)
        except Exception as exc:  # a missing package on the device: report it, go on
            results.append({"what": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        computed[name] = result
        results.append({"what": name, "rows": len(pairs), "seconds": round(seconds, 3),
                        "rows_per_s": round(len(pairs) / seconds, 1), "value": round(result.value, 4)})
    if args.codebleu_corpus_rows:
        # What one bootstrap resample would cost without per-row statistics: one corpus calc_codebleu call.
        from codebleu import calc_codebleu

        n = min(args.codebleu_corpus_rows, len(pairs))
        _, seconds = timed(calc_codebleu, references[:n], generated[:n], lang="python")
        results.append({"what": "calc_codebleu, one corpus call", "rows": n, "seconds": round(seconds, 3),
                        "rows_per_s": round(n / seconds, 1),
                        "note": f"x 1000 resamples = {1000 * seconds / 60:.1f} min per file"})
    with_stats = [computed[name] for name in ("bleu", "codebleu") if name in computed]
    if with_stats:
        _, seconds = timed(summarise, with_stats, len(pairs), samples=1000, confidence=0.95, seed=1)
        results.append({"what": "bootstrap (1000 resamples, BLEU + CodeBLEU)", "rows": len(pairs),
                        "seconds": round(seconds, 3), "rows_per_s": round(len(pairs) / seconds, 1)})


def lm_shapes(name: str) -> dict:
    if name == "smollm2":
        return dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, tie_word_embeddings=True)
    if name == "llama2-7b":
        return dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, tie_word_embeddings=False)
    raise ValueError(name)


def load_lm(args):
    import torch

    from tunelens.models import load_model, load_tokenizer, pick_device, pick_dtype

    if args.model:
        return load_model(args.model, device=args.device)
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(args.tokenizer)
    device = pick_device(args.device)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, **lm_shapes(args.random_lm))
    with torch.device(device):
        model = LlamaForCausalLM(config).to(pick_dtype(device))
    model.eval()
    return model, tokenizer


def bench_lm(args, pairs, results):
    from tunelens.scoring.judge import judge_prompt, rate
    from tunelens.scoring.perplexity import encode_rows, response_nll

    model, tokenizer = load_lm(args)
    split_rows = [{"id": f"r{i}", "instruction": "Answer the task.", "input": ref[:200], "output": gen}
                  for i, (gen, ref) in enumerate(pairs[: args.lm_rows])]
    encoded = encode_rows(split_rows, tokenizer, "alpaca")
    label = args.model or f"random {args.random_lm}"
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    for batch in args.lm_batch:
        response_nll(model, tokenizer, encoded[:batch], batch_size=batch)  # warm-up
        _, seconds = timed(response_nll, model, tokenizer, encoded, batch_size=batch)
        tokens = sum(len(p) + len(r) for p, r in encoded)
        results.append({"what": f"perplexity ({label}, {dtype}, batch {batch})", "rows": len(encoded),
                        "seconds": round(seconds, 3), "rows_per_s": round(len(encoded) / seconds, 1),
                        "tokens_per_s": round(tokens / seconds)})
    prompts = [judge_prompt(row["instruction"], row["input"], row["output"], tokenizer) for row in split_rows]
    for batch in args.lm_batch:
        rate(model, tokenizer, prompts[:batch], batch_size=batch)
        _, seconds = timed(rate, model, tokenizer, prompts, batch_size=batch)
        results.append({"what": f"judge ({label}, {dtype}, batch {batch})", "rows": len(prompts),
                        "seconds": round(seconds, 3), "rows_per_s": round(len(prompts) / seconds, 1)})


def random_bert_dir(args) -> str:
    """A random-weight BERT of a real shape saved with a real BERT tokenizer (bert-score loads a path)."""
    import tempfile

    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    shapes = {"minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
              "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                 intermediate_size=4096)}
    tokenizer = AutoTokenizer.from_pretrained(args.bert_tokenizer)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), **shapes[args.random_bert]))
    out = tempfile.mkdtemp(prefix="bench_bert_")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    args.bert_layers = args.bert_layers or shapes[args.random_bert]["num_hidden_layers"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="Alpaca-format JSON; without it, synthetic word salads")
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bert-dir", help="BERTScore model dir (e.g. results/models/bertscore)")
    parser.add_argument("--bert-layers", type=int, default=None)
    parser.add_argument("--bert-batch", type=int, default=64)
    parser.add_argument("--random-bert", choices=["minilm", "bert-large"])
    parser.add_argument("--bert-tokenizer", help="a BERT tokenizer dir for --random-bert")
    parser.add_argument("--model", help="causal LM dir for perplexity/judge")
    parser.add_argument("--random-lm", choices=["smollm2", "llama2-7b"])
    parser.add_argument("--tokenizer", help="tokenizer dir for --random-lm")
    parser.add_argument("--lm-rows", type=int, default=32)
    parser.add_argument("--lm-batch", type=int, nargs="+", default=[8])
    parser.add_argument("--metrics", nargs="*", default=["bleu", "rougeL", "codebleu", "exact_match", "length", "bertscore"],
                        help="text metrics to time (none: only perplexity/judge)")
    parser.add_argument("--codebleu-corpus-rows", type=int, default=0,
                        help="also time one codebleu.calc_codebleu call on this many rows (a resample's cost "
                        "without per-row statistics)")
    parser.add_argument("--json")
    args = parser.parse_args()

    pairs = real_pairs(args.data, args.rows) if args.data else synthetic_pairs(args.rows)
    if args.random_bert:
        args.bert_dir = random_bert_dir(args)
    results: list[dict] = []
    if args.metrics:
        bench_text_metrics(args, pairs, results)
    if args.model or args.random_lm:
        try:
            bench_lm(args, pairs, results)
        except Exception as exc:
            results.append({"what": "perplexity/judge", "error": f"{type(exc).__name__}: {exc}"})
    machine = platform.processor() or platform.machine()
    try:
        import torch

        if args.device == "cuda" and torch.cuda.is_available():
            machine = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    print(f"machine: {machine}; data: {args.data or 'synthetic'}; rows: {len(pairs)}\n")
    print("| what | rows | seconds | rows/s | note |\n|---|---|---|---|---|")
    for row in results:
        note = row.get("error") or row.get("note") or (f"{row['tokens_per_s']} tok/s" if "tokens_per_s" in row else
                                    f"value {row['value']}" if "value" in row else "")
        print(f"| {row['what']} | {row.get('rows', '')} | {row.get('seconds', '')} | {row.get('rows_per_s', '')} | {note} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"machine": machine, "args": vars(args), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
