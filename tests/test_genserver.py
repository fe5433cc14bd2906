"""The generation server (tunelens/generation/genserver.py) with the hf backend and a tiny model.

Each test runs real generate jobs through `run_generation_job`, the function scripts/generate.py calls, in a
run folder of its own, and ends by stopping that folder's servers and checking that no process of them is
left (vLLM through the server: tests/test_vllm.py::test_dag_generate_jobs_with_vllm).
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from tunelens.generation import genserver
from tunelens.errors import DataError

ROWS = [
    {"id": f"g-{i}", "instruction": text, "input": "", "output": answer}
    for i, (text, answer) in enumerate(
        [("Name a colour.", "Blue."), ("Add 2 and 3.", "5"), ("Say hello.", "Hello."), ("Name a fruit.", "Apple.")]
    )
]
CONFIGS = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 1.0, "top_k": 0}}


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, tmp_path_factory):
    """(model dir, random LoRA adapter dir, test file)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    work = tmp_path_factory.mktemp("genserver")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(work / "adapter")
    test_file = work / "test.jsonl"
    test_file.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return tiny_llama_dir, work / "adapter", test_file


def make_job(tiny, variant="base", config="greedy", **overrides):
    model_dir, adapter_dir, test_file = tiny
    job = dict(test_file=str(test_file), model_name="tiny", model_path=str(model_dir), variant=variant,
               adapter_dir=str(adapter_dir) if variant == "finetuned" else None, decoding_config=CONFIGS[config],
               max_new_tokens=6, seed=7, backend="hf", device="cpu")
    job.update(overrides)
    return job


@pytest.fixture
def run_dir(tmp_path):
    """A run folder for servers; afterwards every server of it is stopped and none of its processes remain."""
    base = tmp_path / "servers"
    yield base
    genserver.stop_servers(base)
    assert genserver.marked_processes(genserver.server_mark(genserver.server_dir(base), "")) == []


def run(tiny, out, name, *, base, server=True, **kwargs):
    job = make_job(tiny, **kwargs)
    meta = genserver.run_generation_job(job, out / f"{name}.jsonl", server=server, base=base, start_timeout_s=180)
    return meta, (out / f"{name}.jsonl").read_bytes()


def test_server_output_is_byte_identical_and_loads_once_per_adapter(tiny, run_dir, tmp_path):
    jobs = [(variant, config) for variant in ("base", "finetuned") for config in CONFIGS]
    served = {job: run(tiny, tmp_path, f"s-{job}", base=run_dir, variant=job[0], config=job[1]) for job in jobs}
    alone = {job: run(tiny, tmp_path, f"a-{job}", base=run_dir, server=False, variant=job[0], config=job[1])
             for job in jobs}  # fmt: skip
    for job in jobs:
        assert served[job][1] == alone[job][1], f"{job}: rows differ between server and in-process generation"
        assert len(served[job][1].splitlines()) == len(ROWS)
    executions = [served[job][0]["execution"] for job in jobs]
    assert {e["mode"] for e in executions} == {"server"}
    assert len({e["server_pid"] for e in executions}) == 1
    # One load for the base model, one for base + adapter; the other two requests reuse them.
    assert [e["loaded"] for e in executions] == [True, False, True, False]
    assert [served[job][0]["load_time_s"] > 0 for job in jobs] == [True, False, True, False]
    # Each request records its server CPU seconds and the server's running total (the report bills them).
    assert all(e["server_cpu_s"] > 0 for e in executions)
    totals = [e["server_cpu_total_s"] for e in executions]
    assert totals == sorted(totals) and all(t >= e["server_cpu_s"] for t, e in zip(totals, executions))
    assert {alone[job][0]["execution"]["mode"] for job in jobs} == {"in-process"}
    # Same sidecar apart from timings and how it ran.
    varying = {"execution", "load_time_s", "generation_time_s", "tokens_per_s"}
    for job in jobs:
        same = {k: v for k, v in served[job][0].items() if k not in varying}
        assert same == {k: v for k, v in alone[job][0].items() if k not in varying}


def test_server_killed_during_a_request_falls_back_to_identical_in_process_output(tiny, run_dir, tmp_path, monkeypatch):
    expected_meta, expected = run(tiny, tmp_path, "expected", base=run_dir, server=False, config="sampled")
    monkeypatch.setenv(genserver.FAULT_ENV, "exit-during-request")  # inherited by the server it starts
    meta, got = run(tiny, tmp_path, "crashed", base=run_dir, config="sampled")
    assert meta["execution"]["mode"] == "in-process"
    assert got == expected
    assert list(genserver.server_dir(run_dir).glob("*.json")) == []  # the dead server's record is gone


def test_server_that_cannot_start_falls_back(tiny, run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(genserver.FAULT_ENV, "exit-at-start")
    started = time.monotonic()
    meta, got = run(tiny, tmp_path, "fallback", base=run_dir)
    assert meta["execution"]["mode"] == "in-process"
    assert time.monotonic() - started < 170  # not the start timeout: the exit is noticed at once
    assert got == run(tiny, tmp_path, "direct", base=run_dir, server=False)[1]


def test_a_jobs_own_error_is_raised_as_is_and_the_server_stays(tiny, run_dir, tmp_path):
    meta, _ = run(tiny, tmp_path, "first", base=run_dir)
    with pytest.raises(DataError, match=r"line 1 \(id g-0\): prompt has \d+ tokens.*max_prompt_tokens=3"):
        run(tiny, tmp_path, "too_long", base=run_dir, max_prompt_tokens=3)
    assert not (tmp_path / "too_long.jsonl").exists() and not (tmp_path / "too_long.meta.json").exists()
    again, _ = run(tiny, tmp_path, "again", base=run_dir, config="sampled")
    assert again["execution"]["server_pid"] == meta["execution"]["server_pid"] and not again["execution"]["loaded"]


def test_concurrent_jobs_start_one_server(tiny, run_dir, tmp_path):
    metas = {}

    def job(name, config):
        metas[name] = run(tiny, tmp_path, name, base=run_dir, config=config)[0]

    threads = [threading.Thread(target=job, args=(name, name)) for name in CONFIGS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert len({meta["execution"]["server_pid"] for meta in metas.values()}) == 1
    assert sorted(meta["execution"]["loaded"] for meta in metas.values()) == [False, True]


def test_idle_server_exits_by_itself(tiny, run_dir, tmp_path):
    job = make_job(tiny)
    meta = genserver.run_generation_job(job, tmp_path / "x.jsonl", base=run_dir, idle_timeout_s=2, start_timeout_s=180)
    mark = genserver.server_mark(genserver.server_dir(run_dir), "")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and genserver.marked_processes(mark):
        time.sleep(0.5)
    assert genserver.marked_processes(mark) == [], f"server {meta['execution']['server_pid']} still running"
    assert list(genserver.server_dir(run_dir).glob("*.json")) == []


def test_a_model_load_on_the_gpu_stops_the_runs_idle_servers(tiny, run_dir, tmp_path, monkeypatch):
    # What tunelens.models.load_model and the fine-tune call on CUDA (simulated: the call itself).
    monkeypatch.setenv(genserver.SERVER_DIR_ENV, str(run_dir))
    meta = genserver.run_generation_job(make_job(tiny), tmp_path / "x.jsonl", start_timeout_s=180)
    assert meta["execution"]["mode"] == "server"
    mark = genserver.server_mark(genserver.server_dir(run_dir), "")
    assert genserver.marked_processes(mark) != []
    monkeypatch.setenv(genserver.IN_SERVER_ENV, "1")  # inside a server (its own loads): nothing stops
    genserver.release_gpu_for_this_job()
    assert genserver.marked_processes(mark) != []
    monkeypatch.delenv(genserver.IN_SERVER_ENV)
    genserver.release_gpu_for_this_job()
    assert genserver.marked_processes(mark) == []


def test_a_load_that_fits_beside_the_server_keeps_it(tiny, run_dir, tmp_path, monkeypatch):
    """On a GPU with room for both (an H200 holds several 7B models), a probe or perplexity job's load does
    not stop the generation server: stopping it would only make the next generate job load the model again."""
    import torch

    monkeypatch.setenv(genserver.SERVER_DIR_ENV, str(run_dir))
    meta = genserver.run_generation_job(make_job(tiny), tmp_path / "x.jsonl", start_timeout_s=180)
    assert meta["execution"]["mode"] == "server"
    mark = genserver.server_mark(genserver.server_dir(run_dir), "")
    model_dir = tiny[0]
    needed = genserver.gpu_bytes_to_load(model_dir, 2)
    from safetensors.torch import load_file

    parameters = sum(tensor.numel() for tensor in load_file(str(model_dir / "model.safetensors")).values())
    assert needed == int(1.25 * parameters * 2) + 2 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (needed + 1, 10 * needed))
    genserver.release_gpu_for_this_job(needed)
    assert genserver.marked_processes(mark) != []  # room for both: kept
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (needed - 1, 10 * needed))
    genserver.release_gpu_for_this_job(needed)
    assert genserver.marked_processes(mark) == []  # not enough room: stopped
    assert genserver.gpu_bytes_to_load("org/hub-id") is None


def test_server_ends_with_the_snakemake_process_that_ran_its_jobs(tiny, run_dir, tmp_path):
    """A Snakemake killed without its onsuccess/onerror (SIGKILL, a cluster allocation's end) leaves no server:
    the server watches the Snakemake process above its first client. Here a stand-in named `snakemake` runs
    one client job and exits; the server (idle timeout 1 h) must go at once."""
    import os
    import subprocess
    import sys

    client = ("import json, sys\nfrom tunelens.generation import genserver\n"
              "meta = genserver.run_generation_job(json.loads(sys.argv[1]), sys.argv[2], base=sys.argv[3],\n"
              "                                    idle_timeout_s=3600, start_timeout_s=180)\n"
              "assert meta['execution']['mode'] == 'server', meta['execution']\n")
    fake = tmp_path / "snakemake"
    fake.write_text(f"#!{sys.executable}\nimport subprocess, sys\n"
                    f"sys.exit(subprocess.run([sys.executable, '-c', {client!r}, *sys.argv[1:]]).returncode)\n")
    fake.chmod(0o755)
    repo = str(genserver.Path(genserver.__file__).resolve().parents[2])
    result = subprocess.run([str(fake), json.dumps(make_job(tiny)), str(tmp_path / "x.jsonl"), str(run_dir)],
                            env={**os.environ, "PYTHONPATH": repo}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    mark = genserver.server_mark(genserver.server_dir(run_dir), "")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and genserver.marked_processes(mark):
        time.sleep(0.5)
    assert genserver.marked_processes(mark) == []
    log_text = "".join(path.read_text() for path in genserver.server_dir(run_dir).glob("*.log"))
    assert "that ran its jobs is gone: exiting" in log_text


def make_early_exit_job(tiny, variant="base", layer=2, **overrides):
    model_dir, adapter_dir, test_file = tiny
    job = dict(model_name="tiny", source=str(model_dir), model_path=str(model_dir),
               adapter_dir=str(adapter_dir) if variant == "finetuned" else None, variant=variant,
               test_path=str(test_file), layer=layer, layer_specs=[2, 4], expected_layers=[2, 4],
               prompt_format="chat", decoding={"temperature": 0.0}, max_new_tokens=6, seed=7, device="cpu",
               backend="hf", gpus=1, vllm_options=None)  # fmt: skip
    job.update(overrides)
    return job


def test_early_exit_jobs_share_the_generation_server_with_byte_identical_output(tiny, run_dir, tmp_path):
    """Early-exit jobs are requests to the model's generation server (scripts/early_exit.py): every layer and
    both variants reuse the model that the generate jobs loaded, and the files are the bytes that
    tunelens.probe.probe.run_early_exit writes in a job of its own."""
    from tunelens.probe.probe import run_early_exit

    run(tiny, tmp_path, "gen-base", base=run_dir)  # the generate job that starts the server, loads base
    jobs = [(variant, layer) for variant in ("base", "finetuned") for layer in (2, 4)]
    served = {}
    for variant, layer in jobs:
        name = f"ee-{variant}-{layer}"
        meta = genserver.run_early_exit_job(make_early_exit_job(tiny, variant, layer), tmp_path / f"{name}.jsonl",
                                            tmp_path / f"{name}.meta.json", base=run_dir, start_timeout_s=180)
        served[(variant, layer)] = meta
        job = {k: v for k, v in make_early_exit_job(tiny, variant, layer).items()
               if k not in ("backend", "gpus", "vllm_options")}  # fmt: skip
        alone = run_early_exit(**job, output_jsonl=tmp_path / f"{name}.alone.jsonl",
                               output_meta=tmp_path / f"{name}.alone.meta.json")
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (tmp_path / f"{name}.alone.jsonl").read_bytes(), name
        varying = {"execution", "load_time_s", "generation_time_s", "tokens_per_s"}
        assert {k: v for k, v in meta.items() if k not in varying} == {
            k: v for k, v in alone.items() if k not in varying}
        written = json.loads((tmp_path / f"{name}.meta.json").read_text())
        assert written["execution"] == meta["execution"] and written["layer"] == layer
    executions = [served[job]["execution"] for job in jobs]
    assert {e["mode"] for e in executions} == {"server"}
    # One server for the generate and the early-exit jobs; base was loaded by the generate job, the adapter
    # by the first fine-tuned early-exit job, and nothing else loads.
    assert len({e["server_pid"] for e in executions}) == 1
    assert [e["loaded"] for e in executions] == [False, False, True, False]
    # The next generate job still gets the whole model (the early exit truncated it only inside its request).
    served_gen, served_bytes = run(tiny, tmp_path, "gen-base-after", base=run_dir)
    _, alone_bytes = run(tiny, tmp_path, "gen-base-alone", base=run_dir, server=False)
    assert served_gen["execution"]["mode"] == "server" and served_bytes == alone_bytes


def test_early_exit_of_a_vllm_model_runs_in_the_job(tiny, run_dir, tmp_path):
    """A model generated with vLLM: its server holds an engine, not the hf model, so the job runs itself."""
    meta = genserver.run_early_exit_job(make_early_exit_job(tiny, backend="vllm"), tmp_path / "ee.jsonl",
                                        tmp_path / "ee.meta.json", base=run_dir, start_timeout_s=180)
    assert meta["execution"]["mode"] == "in-process"
    assert list(genserver.server_dir(run_dir).glob("*.json")) == []


def test_servers_on_the_cpu_live_side_by_side_and_one_on_the_gpu_is_stopped(tiny, run_dir, tmp_path):
    """device auto (the embedded default) on a machine without CUDA: starting the second model's server does not
    stop the first (each restart would import torch and load the model again); a server that records it holds
    a GPU is still stopped for another model's (one model at a time on a GPU)."""
    folder = genserver.server_dir(run_dir)
    first = run(tiny, tmp_path, "a", base=run_dir, device="auto", seed=1)[0]["execution"]["server_pid"]
    second = run(tiny, tmp_path, "b", base=run_dir, device="auto", seed=2)[0]["execution"]["server_pid"]
    infos = {json.loads(path.read_text())["pid"]: path for path in folder.glob("*.json")}
    assert set(infos) == {first, second}  # both alive and recorded: the first one was not stopped
    assert all(json.loads(path.read_text())["gpu"] is False for path in infos.values())
    # Pretend the first holds a GPU: the next model's server start stops it, and keeps the second (on the CPU).
    record = json.loads(infos[first].read_text())
    infos[first].write_text(json.dumps({**record, "gpu": True}))
    third = run(tiny, tmp_path, "c", base=run_dir, device="auto", seed=3)[0]["execution"]["server_pid"]
    assert {json.loads(path.read_text())["pid"] for path in folder.glob("*.json")} == {second, third}


def test_score_jobs_get_the_same_bertscore_from_one_server(run_dir, tmp_path, monkeypatch):
    """scripts/score.py sets tunelens.scoring.metrics.BERTSCORE_RUNNER to the run's BERTScore server: the metric gets
    the very floats (and details) it computes in the job, plain and rescaled, with an empty answer among the
    rows, from one server that loaded the scorer once."""
    from tunelens.scoring import metrics
    from tunelens.scoring.metrics import METRICS, BertScoreSettings, ScoringContext
    from tunelens.models import materialize_embedded

    minilm = str(materialize_embedded("all-minilm-l6-v2", tmp_path / "bertscore"))
    baseline = tmp_path / "baseline.csv"
    baseline.write_text("LAYER,P,R,F\n" + "".join(f"{layer},0.2,0.2,0.3\n" for layer in range(7)))
    generated = ["The cat sat on the mat.", "", "Hello there.", "Völlig anders."]
    references = ["A cat sat on a mat.", "Some reference.", "Hello there.", "Entirely different."]
    rows = [{"num_generated_tokens": len(g.split())} for g in generated]
    # A score job's one thread (SCORE_THREADS), in this process and in the server it starts (the OpenMP
    # variables are inherited): CPU float sums depend on the thread count.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    contexts = [ScoringContext(bertscore=BertScoreSettings(model=minilm, num_layers=6, batch_size=2), device="cpu"),
                ScoringContext(bertscore=BertScoreSettings(model=minilm, num_layers=6, rescale_with_baseline=True,
                                                           baseline_path=str(baseline)), device="cpu")]  # fmt: skip
    try:
        alone = [METRICS["bertscore"].compute(generated, references, rows, context) for context in contexts]
    finally:
        torch.set_num_threads(threads)

    def no_local_scoring(*args):
        raise AssertionError("scored in the job, not by the server")

    monkeypatch.setattr(metrics, "bertscore_f1", no_local_scoring)
    monkeypatch.setattr(metrics, "BERTSCORE_RUNNER", metrics.bertscore_runner(base=run_dir, start_timeout_s=180))
    served = [METRICS["bertscore"].compute(generated, references, rows, context) for context in contexts]
    for got, expected in zip(served, alone):
        assert got.per_row.tolist() == expected.per_row.tolist()  # exactly the same floats
        assert got.value == expected.value
        # the same details, plus the server's record of the request (its CPU, billed by the report's costs)
        server = got.details.pop("server")
        assert expected.details.pop("server") is None and got.details == expected.details
        assert server["mode"] == "server" and server["server_cpu_s"] > 0
    infos = list(genserver.server_dir(run_dir).glob("*.json"))
    assert len(infos) == 1  # one server for both settings (same model, device and threads)
    assert "listening" in (infos[0].with_suffix(".log")).read_text()


# --------------------------------------------------------------------------------------------- perplexity, logit lens
SERVER_KEYS = ("backend", "gpus", "vllm_options")


def make_perplexity_job(tiny, variant="base", **overrides):
    model_dir, adapter_dir, test_file = tiny
    job = dict(test_file=str(test_file), model_name="tiny", model_path=str(model_dir), model_source="local",
               variant=variant, adapter_dir=str(adapter_dir) if variant == "finetuned" else None,
               prompt_format="chat", batch_size=3, samples=100, seed=7, device="cpu", backend="hf", gpus=1,
               vllm_options=None)  # fmt: skip
    job.update(overrides)
    return job


def make_lens_job(tiny, variant="base", **overrides):
    model_dir, adapter_dir, test_file = tiny
    job = dict(model_name="tiny", source="local", model_path=str(model_dir),
               adapter_dir=str(adapter_dir) if variant == "finetuned" else None, variant=variant,
               test_path=str(test_file), layer_specs=[2, 4], expected_layers=[2, 4], prompt_format="chat",
               lens_prompts=["Name a colour."], lens_test_prompts=2, top_k=3, new_tokens=3, seed=7, device="cpu",
               backend="hf", gpus=1, vllm_options=None)  # fmt: skip
    job.update(overrides)
    return job


def run_perplexity(tiny, out, name, *, base, variant="base", **overrides):
    """What scripts/perplexity.py runs: (summary, its two files)."""
    from tunelens.scoring.perplexity import run_perplexity_job

    files = (out / f"{name}.json", out / f"{name}.rows.csv")
    return run_perplexity_job(make_perplexity_job(tiny, variant, **overrides), *files, base=base,
                              start_timeout_s=180), files


def run_lens(tiny, out, name, *, base, variant="base", **overrides):
    """What scripts/logit_lens.py runs: (lens, its three files)."""
    from tunelens.probe.lens import run_logit_lens_job

    files = (out / f"{name}.json", out / f"{name}.heatmap.png", out / f"{name}.entropy.png")
    return run_logit_lens_job(make_lens_job(tiny, variant, **overrides), *files, base=base, start_timeout_s=180), files


def _without(record: dict, varying: dict) -> str:
    """The JSON text of `record` without its timing keys (`varying`: top-level keys, and {key: subkeys})."""
    record = {k: v for k, v in record.items() if k not in varying or varying[k]}
    for key, subkeys in varying.items():
        if subkeys and key in record:
            record[key] = {k: v for k, v in record[key].items() if k not in subkeys}
    return json.dumps(record)


PERPLEXITY_TIMINGS = {"execution": None, "source": ("load_time_s", "score_time_s", "rows_per_s")}
LENS_TIMINGS = {"execution": None, "load_time_s": None, "lens_time_s": None}


def test_perplexity_and_logit_lens_through_the_server_write_the_bytes_of_an_in_process_job(tiny, run_dir, tmp_path):
    """scripts/perplexity.py and scripts/logit_lens.py send their job to the model's generation server: the
    per-row CSV and both plots are the bytes that today's in-process functions (reference_perplexity,
    run_logit_lens) write, and the JSON files equal theirs apart from the timings and `execution`."""
    from tunelens.scoring.perplexity import reference_perplexity
    from tunelens.probe.lens import run_logit_lens

    for variant in ("base", "finetuned"):
        served, (ppl_json, ppl_csv) = run_perplexity(tiny, tmp_path, f"ppl-{variant}", base=run_dir, variant=variant)
        job = {k: v for k, v in make_perplexity_job(tiny, variant).items() if k not in SERVER_KEYS}
        alone = reference_perplexity(job.pop("test_file"), tmp_path / f"ppl-{variant}.alone.json",
                                     tmp_path / f"ppl-{variant}.alone.rows.csv", **job)
        assert ppl_csv.read_bytes() == (tmp_path / f"ppl-{variant}.alone.rows.csv").read_bytes(), variant
        written = json.loads(ppl_json.read_text())
        assert _without(written, PERPLEXITY_TIMINGS) == _without(alone, PERPLEXITY_TIMINGS), variant
        assert written["execution"]["mode"] == "server" and written["execution"]["loaded"] is True
        assert written["source"]["load_time_s"] > 0  # the load this request paid

        lens, (lens_json, heatmap, entropy) = run_lens(tiny, tmp_path, f"lens-{variant}", base=run_dir,
                                                       variant=variant)
        job = {k: v for k, v in make_lens_job(tiny, variant).items() if k not in SERVER_KEYS}
        alone_files = {"output_json": tmp_path / f"lens-{variant}.alone.json",
                       "output_heatmap": tmp_path / f"lens-{variant}.alone.heatmap.png",
                       "output_entropy": tmp_path / f"lens-{variant}.alone.entropy.png"}
        alone = run_logit_lens(**job, **alone_files)
        assert heatmap.read_bytes() == alone_files["output_heatmap"].read_bytes(), variant
        assert entropy.read_bytes() == alone_files["output_entropy"].read_bytes(), variant
        written = json.loads(lens_json.read_text())
        assert _without(written, LENS_TIMINGS) == _without(alone, LENS_TIMINGS), variant
        assert written["execution"]["mode"] == "server" and written["execution"]["loaded"] is False  # perplexity's
        assert written["execution"]["server_pid"] == served["execution"]["server_pid"]


def test_a_models_jobs_load_it_once_per_variant(tiny, run_dir, tmp_path):
    """The GPU jobs of one model in DAG order (both variants' generate, early exit, perplexity and logit lens,
    interleaved as Snakemake may run them): one server serves them all, and it loads each variant's model
    exactly once; no perplexity or logit_lens job loads a model of its own."""
    executions = []  # (variant, job kind, execution)
    for variant in ("base", "finetuned"):
        executions.append((variant, "perplexity", run_perplexity(tiny, tmp_path, f"p-{variant}", base=run_dir,
                                                                 variant=variant)[0]["execution"]))
        executions.append((variant, "generate", run(tiny, tmp_path, f"g-{variant}", base=run_dir,
                                                    variant=variant)[0]["execution"]))
    for variant in ("finetuned", "base"):
        executions.append((variant, "logit_lens", run_lens(tiny, tmp_path, f"l-{variant}", base=run_dir,
                                                           variant=variant)[0]["execution"]))
        meta = genserver.run_early_exit_job(make_early_exit_job(tiny, variant, 2), tmp_path / f"e-{variant}.jsonl",
                                            tmp_path / f"e-{variant}.meta.json", base=run_dir, start_timeout_s=180)
        executions.append((variant, "early_exit", meta["execution"]))
        executions.append((variant, "generate", run(tiny, tmp_path, f"g2-{variant}", base=run_dir, variant=variant,
                                                    config="sampled")[0]["execution"]))
    assert {e["mode"] for _, _, e in executions} == {"server"}, executions
    assert len({e["server_pid"] for _, _, e in executions}) == 1
    loads = {variant: [kind for v, kind, e in executions if v == variant and e["loaded"]]
             for variant in ("base", "finetuned")}
    assert loads == {"base": ["perplexity"], "finetuned": ["perplexity"]}, loads
    # The files record it too (what the cost report and bench/bench_genserver.py read).
    for name in ("p-base.json", "p-finetuned.json", "l-base.json", "l-finetuned.json"):
        assert json.loads((tmp_path / name).read_text())["execution"]["mode"] == "server", name
    assert [e["request"] for _, _, e in executions] == list(range(1, len(executions) + 1))


def test_perplexity_and_lens_of_a_vllm_model_run_in_the_job(tiny, run_dir, tmp_path):
    """A model generated with vLLM: its server holds an engine, not the hf model, so the jobs run themselves."""
    ppl, _ = run_perplexity(tiny, tmp_path, "ppl", base=run_dir, backend="vllm")
    assert ppl["execution"]["mode"] == "in-process" and ppl["execution"]["loaded"] is True
    lens, _ = run_lens(tiny, tmp_path, "lens", base=run_dir, backend="vllm")
    assert lens["execution"]["mode"] == "in-process"
    assert list(genserver.server_dir(run_dir).glob("*.json")) == []
