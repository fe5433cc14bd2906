"""Cluster execution: profiles, partial reruns (exact dry-run job sets) and a real local SLURM.

    pytest tests/test_cluster.py -m "not slurm"     # profiles + dry runs, ~1 min on 2 cores
    pytest tests/test_cluster.py -m slurm           # starts tests/slurm/start-slurm.sh (root), ~3.5 min

Dry-run tests fake a finished study in a temp workdir (every output created, then
`snakemake --touch --forceall` records metadata as a real run would), change one thing, and assert the
exact set of (rule, wildcards) Snakemake plans. No model is loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_dag import PlannedJob, dry_run, fake_finished_study, parse_dry_run, snakemake  # noqa: E402

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
TINY = REPO / "tests" / "slurm" / "Snakefile"
SLURM_DIR = REPO / "tests" / "slurm"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def load_profile(name: str) -> dict:
    return yaml.safe_load((REPO / "profiles" / name / "config.yaml").read_text())


def run_tiny(workdir: Path, *args: str, env: dict | None = None, timeout: int = 900):
    """tests/slurm/Snakefile in `workdir`; returns the CompletedProcess (stdout + stderr in .stdout)."""
    return subprocess.run(
        [SNAKEMAKE, "--snakefile", str(TINY), "--directory", str(workdir), *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


# =========================================================================================== profiles
def test_parse_dry_run_reads_rules_wildcards_and_outputs():
    text = """
[Mon Nov 23 11:10:18 2026]
rule materialize_model:
    output: results/models/smollm2
    log: logs/materialize_model/smollm2.log
    jobid: 0
    reason: Missing output files: results/models/smollm2
    wildcards: model=smollm2
    resources: tmpdir=/tmp, runtime=30
[Mon Nov 23 11:10:18 2026]
localrule split:
    output: results/data/demo/train.jsonl, results/data/demo/test.jsonl
    jobid: 1
Job stats:
"""
    assert parse_dry_run(text) == [
        PlannedJob("materialize_model", (("model", "smollm2"),), ("results/models/smollm2",)),
        PlannedJob("split", (), ("results/data/demo/train.jsonl", "results/data/demo/test.jsonl")),
    ]


def test_slurm_local_differs_from_slurm_only_in_local_cluster_settings():
    slurm, local = load_profile("slurm"), load_profile("slurm-local")
    changed = {key for key in slurm.keys() | local.keys() if slurm.get(key) != local.get(key)}
    assert changed == {
        "jobs",
        "latency-wait",
        "retries",
        "default-resources",
        "slurm-init-seconds-before-status-checks",
        "slurm-keep-successful-logs",
    }
    resources_changed = {
        key
        for key in slurm["default-resources"].keys() | local["default-resources"].keys()
        if slurm["default-resources"].get(key) != local["default-resources"].get(key)
    }
    assert resources_changed == {"mem_mb", "runtime"}


def _min_job_age(slurm_conf: str) -> int:
    return int(re.search(r"^MinJobAge=(\d+)", slurm_conf, re.M).group(1))


def test_squeue_status_polling_sees_finished_jobs():
    # The plugin's squeue mode misses jobs that finished more than MinJobAge ago; it needs
    # MinJobAge >= 3 x the first poll delay (SLURM's default MinJobAge is 300 s).
    for name, min_job_age in [("slurm", 300), ("slurm-local", _min_job_age((SLURM_DIR / "slurm.conf.in").read_text()))]:
        profile = load_profile(name)
        assert profile["slurm-status-command"] == "squeue", name
        assert 3 * profile["slurm-init-seconds-before-status-checks"] <= min_job_age, name


def test_slurm_profile_passes_resources_to_jobs(tmp_path):
    """Dry run through the real profile: GPU rules carry gpu=1, CPU rules no gpu, partition from the env."""
    result = run_tiny(
        tmp_path, "--profile", "profiles/slurm", "--dry-run", env={"TUNELENS_SLURM_PARTITION": "gpu-a100"}
    )
    assert result.returncode == 0, result.stdout[-3000:]
    resources = {
        block.group(1): block.group(2)
        for block in re.finditer(r"^rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", result.stdout, re.M)
    }
    assert "gpu=1" in resources["gpu_job"].split(", ")
    assert not any(item.startswith("gpu=") for item in resources["cpu_job"].split(", "))
    for rule_resources in resources.values():
        items = rule_resources.split(", ")
        assert "slurm_partition=gpu-a100" in items
        assert "slurm_account=" in items  # unset: the plugin guesses or submits without -A
        assert "cpus_per_task=1" in items


def test_local_profile_gpu_limit_serialises_gpu_jobs(tmp_path):
    def intervals(workdir, *extra):
        result = run_tiny(workdir, "--profile", "profiles/local", "hold/1.txt", "hold/2.txt", *extra)
        assert result.returncode == 0, result.stdout[-3000:]
        return [tuple(map(float, (workdir / f"hold/{i}.txt").read_text().split())) for i in (1, 2)]

    (first, second) = sorted(intervals(tmp_path / "one_gpu"))
    assert second[0] >= first[1], "two gpu=1 jobs overlapped under profiles/local (gpu: 1)"
    # The same jobs do overlap when two GPUs are declared: the limit, not chance, serialised them.
    (first, second) = sorted(intervals(tmp_path / "two_gpus", "--resources", "gpu=2"))
    assert second[0] < first[1], "two gpu=1 jobs did not run together with --resources gpu=2"


def test_allocation_runner_tells_its_jobs_whether_a_server_can_be_reused(monkeypatch):
    """The Snakemake process of a SLURM allocation (`--executor slurm-jobstep --mode remote --target-jobs ...`)
    sets TUNELENS_ALLOCATION_RUNNER for its jobs: itself (pid:starttime) when it runs a group, 'single' when
    it runs one job; other Snakemake processes leave it alone."""
    from tunelens import servers

    monkeypatch.delenv(servers.RUNNER_ENV, raising=False)
    monkeypatch.setattr(servers, "snakemake_ancestor", lambda: "4242:17")
    runner = ["python", "-m", "snakemake", "--snakefile", "Snakefile", "--target-jobs"]
    tail = ["--allowed-rules", "generate", "--executor", "slurm-jobstep", "--jobs", "1", "--mode", "remote"]
    group = [*runner, "generate:model=m,variant=base,decoding=a", "early_exit:model=m,variant=base,layer=2", *tail]
    one = [*runner, "generate:model=m,variant=base,decoding=a", *tail]
    step = [*runner, "generate:model=m,variant=base,decoding=a", "--cores", "all", "--mode", "remote"]

    # Locally (no runner): servers as configured, watching the nearest Snakemake process.
    assert servers.announce_job_runner(remote=False, argv=group) is None
    assert servers.server_reusable() and servers.server_watch() == "4242:17"
    # A group's allocation: servers watch the allocation's Snakemake process, not the job's own.
    me = f"{os.getpid()}:{servers._start_time(os.getpid())}"
    assert servers.announce_job_runner(remote=True, argv=group) == me
    assert os.environ[servers.RUNNER_ENV] == me
    assert servers.server_reusable() and servers.server_watch() == me
    # The Snakemake process of one job step inside it (local executor) keeps what the runner said.
    assert servers.announce_job_runner(remote=True, argv=step) is None
    assert servers.server_watch() == me
    # An allocation for one job: no server (no other job could use it).
    assert servers.announce_job_runner(remote=True, argv=one) == servers.RUNNER_SINGLE
    assert not servers.server_reusable()
    assert servers.announce_job_runner(remote=True, argv=[*group[:-6], "--executor=slurm-jobstep", "--mode", "remote"]) == me


def test_slurm_profiles_group_each_model_and_variants_jobs():
    """Both SLURM profiles put the four model-job rules (and the evaluation-set twins) of one (model, variant)
    into one group, spanning all its jobs; the local profile groups nothing."""
    expected = {f"{rule}=model_{{model}}_{{variant}}" for rule in
                ("generate", "generate_evalset", "early_exit", "logit_lens", "perplexity", "perplexity_evalset")}  # fmt: skip
    for name in ("slurm", "slurm-local"):
        profile = load_profile(name)
        assert set(profile["groups"]) == expected, name
        ((group, count),) = [item.split("=") for item in profile["group-components"]]
        assert group == "model_{model}_{variant}" and int(count) >= 1000, name
    assert "groups" not in load_profile("local")


# =========================================================================================== real SLURM
# The cluster fixture (`slurm_cluster`) lives in tests/conftest.py: one cluster per test session, shared by
# the xdist workers, stopped when the session ends.


def submitted_slurm_jobs(output: str) -> dict[str, str]:
    """SLURM job id -> Snakemake rule of every job this Snakemake run submitted: ids from the plugin's
    'Job N has been submitted with SLURM jobid X', rules from the job comment the plugin sets
    (`rule_<rule>` or `rule_<rule>_wildcards_<values>`)."""
    job_ids = re.findall(r"has been submitted with SLURM jobid (\d+)", output)
    if not job_ids:
        return {}
    result = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i %k"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    comments = dict(line.split(maxsplit=1) for line in result.stdout.splitlines())
    return {job_id: comments[job_id].removeprefix("rule_").split("_wildcards_")[0] for job_id in job_ids}


def slurm_states(job_ids) -> dict[str, str]:
    """job id -> state as squeue reports it (finished jobs stay visible for MinJobAge)."""
    result = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i %T"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return dict(line.split() for line in result.stdout.splitlines())


def scontrol_job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True)
    return dict(item.split("=", 1) for item in out.stdout.split() if "=" in item)


# The SLURM tests run in file order on one worker (`make test` distributes whole modules: --dist loadscope).
# The failure/timeout run (its job waits out a one-minute SLURM time limit) starts in the background at the
# first of them and is checked by the last, so that minute passes beside the other SLURM work.
class BackgroundRun:
    """A tests/slurm/Snakefile run started now. As soon as it ends, a thread asks SLURM what became of the jobs
    it submitted (rule and state per job id), because slurmctld forgets finished jobs after MinJobAge (600 s
    here) and the test that reads them may run much later. .result() waits for both."""

    def __init__(self, workdir: Path, *args: str):
        self.workdir = workdir
        self.log = workdir.parent / f"{workdir.name}.out"  # a file, not a pipe nobody reads while it runs
        self.jobs: dict[str, str] = {}
        self.states: dict[str, str] = {}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [SNAKEMAKE, "--snakefile", str(TINY), "--directory", str(workdir), *args],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
        self.watcher = threading.Thread(target=self._record_slurm_jobs, daemon=True)
        self.watcher.start()

    def _record_slurm_jobs(self) -> None:
        self.process.wait()
        self.jobs = submitted_slurm_jobs(self.log.read_text())
        self.states = slurm_states(self.jobs) if self.jobs else {}

    def result(self, timeout: int = 900) -> subprocess.CompletedProcess:
        self.process.wait(timeout=timeout)
        self.watcher.join(timeout=60)
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, self.log.read_text())


@pytest.fixture(scope="module")
def failure_and_timeout_run(slurm_cluster, tmp_path_factory):
    run = BackgroundRun(tmp_path_factory.mktemp("slurm_failures"), "--profile", "profiles/slurm-local",
                        "fails.txt", "times_out.txt")  # fmt: skip
    yield run
    if run.process.poll() is None:
        run.process.kill()
        run.process.wait()


@pytest.mark.slurm
def test_slurm_gpu_request_and_retry_with_more_memory(slurm_cluster, failure_and_timeout_run, tmp_path):
    result = run_tiny(tmp_path, "--profile", "profiles/slurm-local")
    assert result.returncode == 0, result.stdout[-4000:]
    jobs = submitted_slurm_jobs(result.stdout)
    assert sorted(jobs.values()) == ["cpu_job", "gpu_job", "needs_retry", "needs_retry"]
    states = slurm_states(jobs)
    retried = sorted((job_id for job_id, rule in jobs.items() if rule == "needs_retry"), key=int)
    assert [states[job_id] for job_id in retried] == ["FAILED", "COMPLETED"]
    assert {states[job_id] for job_id, rule in jobs.items() if rule != "needs_retry"} == {"COMPLETED"}

    # The GPU rule got a GPU from SLURM, the CPU rule none.
    gpu_line = dict(item.split("=", 1) for item in (tmp_path / "gpu_job.txt").read_text().split())
    assert gpu_line["cuda"] == "0"
    assert "gpu:1" in scontrol_job(gpu_line["job"]).get("TresPerJob", "")
    cpu_line = dict(item.split("=", 1) for item in (tmp_path / "cpu_job.txt").read_text().split())
    assert cpu_line["cuda"] == "none"
    assert "gpu" not in scontrol_job(cpu_line["job"]).get("TresPerJob", "")
    # attempt 1 asked for 100 MB and failed its check; the retry asked for 200 MB.
    attempts = [line.split()[1] for line in (tmp_path / "attempts.log").read_text().splitlines()]
    assert attempts == ["mem=100", "mem=200"]


# -------------------------------------------------------------------- the smoke study, SLURM vs local
SMOKE = REPO / "configs" / "smoke.yaml"
# One thread everywhere, so the SLURM jobs (1 CPU each) and the local run compute the same numbers.
SAME_NUMERICS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **OFFLINE_ENV}


def tiny_smoke_config(directory: Path, model_dir: Path) -> Path:
    """configs/smoke.yaml with its model replaced by the suite's 4-layer random Llama (SmolLM2's tokenizer and
    chat template) and the metrics that need no model of their own: every stage of the study still runs, on a
    model that costs almost nothing to load and run. What the SLURM test compares is where jobs ran, not what
    a real model learns (`make run` shows that); BERTScore's model load was most of each score job's CPU.
    One probe layer (the middle one: a real early exit) instead of smoke.yaml's two: the second layer only added
    four more jobs of the same rules, each a SLURM job that starts Snakemake and torch again."""
    config = yaml.safe_load(SMOKE.read_text())
    (resources,) = [model["resources"] for model in config["models"].values()]
    config["models"] = {"tiny": {"source": str(model_dir), "prompt_format": "chat", "resources": resources}}
    config["scoring"]["metrics"] = ["bleu", "rougeL", "exact_match", "length"]
    config["probe"]["layers"] = [0.5]
    path = directory / "smoke-tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_study(workdir: Path, configfile: Path, *args: str) -> subprocess.Popen:
    """A study in `workdir`, started now; its output goes to `<workdir>.out`."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir.parent / f"{workdir.name}.out", "w") as log:
        return subprocess.Popen(
            [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
             "--configfile", str(configfile), *args],
            cwd=REPO, env={**os.environ, **SAME_NUMERICS_ENV}, stdout=log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip


def finish_study(process: subprocess.Popen, workdir: Path) -> subprocess.CompletedProcess:
    """Wait for a start_study run: its result, with the run's output in .stdout."""
    process.wait(timeout=3600)
    output = (workdir.parent / f"{workdir.name}.out").read_text()
    return subprocess.CompletedProcess(process.args, process.returncode, output)


def comparable_results(workdir: Path) -> dict[str, object]:
    """What must not depend on where jobs ran: generated text, metric values, the summary table.
    (.meta.json files, plots and summary.csv's compute-cost rows hold timings and paths, so they are not compared.)"""
    results = workdir / "results"
    comparable = {}
    for path in sorted(results.rglob("*")):
        relative = path.relative_to(results).as_posix()
        if path.suffix == ".jsonl" and relative.startswith(("generations/", "probe/")):
            comparable[relative] = path.read_text()
        elif path.suffix == ".json" and relative.startswith(("scores/", "perplexity/", "probe/")):
            data = json.loads(path.read_text())
            if "metrics" in data:
                comparable[relative] = data["metrics"]
        elif relative == "summary.csv":
            # The compute-cost rows measure where and how fast the jobs ran: everything else must match.
            comparable[relative] = [line for line in path.read_text().splitlines() if ",compute_cost," not in line]
    return comparable


# Rules whose jobs profiles/slurm runs in one allocation per (model, variant) (its `groups`).
GROUPED_RULES = {"generate", "early_exit", "logit_lens", "perplexity"}


def model_loads(workdir: Path) -> dict[tuple[str, str], int]:
    """(model, variant) -> how many of its jobs loaded the model (or built the engine), from the `execution`
    record of every output that has one (generate and early_exit metas; any other job that asks the server)."""
    loads: dict[tuple[str, str], int] = {}
    results = workdir / "results"
    for path in sorted(results.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        if not (isinstance(data, dict) and isinstance(data.get("execution"), dict)):
            continue
        parts = path.relative_to(results).parts  # <kind>/<model>/<variant>/... or perplexity/<model>/<variant>.json
        key = (parts[1], parts[2].split(".")[0])
        loads[key] = loads.get(key, 0) + int(bool(data["execution"].get("loaded")))
    return loads


def server_starts(workdir: Path) -> int:
    """Generation servers started in `workdir` (each logs one 'listening on' line in .tunelens/servers/<host>/)."""
    return sum(log.read_text().count(" listening on ") for log in (workdir / ".tunelens" / "servers").rglob("*.log"))


@pytest.mark.slurm
def test_smoke_study_under_slurm_equals_local_run(slurm_cluster, failure_and_timeout_run, tiny_llama_dir, tmp_path):
    """The smoke study under profiles/slurm-local and locally: the same results; on SLURM, each (model, variant)'s
    model jobs in one allocation that asks for one job's resources and loads the model once; afterwards a
    deleted generation plans exactly its own job and what reads it."""
    smoke = tiny_smoke_config(tmp_path, tiny_llama_dir)
    planned, _ = dry_run(tmp_path / "slurm", smoke)
    # Both runs at once: the SLURM run mostly waits on sbatch and status polls, the local one computes.
    started = time.perf_counter()
    slurm_process = start_study(tmp_path / "slurm", smoke, "--profile", "profiles/slurm-local")
    local_process = start_study(tmp_path / "local", smoke, "--profile", "profiles/local", "--cores", "2")
    slurm = finish_study(slurm_process, tmp_path / "slurm")
    slurm_seconds = time.perf_counter() - started
    local = finish_study(local_process, tmp_path / "local")
    both_seconds = time.perf_counter() - started
    assert slurm.returncode == 0, slurm.stdout[-6000:]
    # Every planned job went through sbatch, once, and SLURM says it completed; only localrules and the
    # output-less target rule `all` run inside Snakemake itself. The model jobs of one (model, variant) went
    # as one group job (comment rule_<group>_<its rules>).
    jobs = submitted_slurm_jobs(slurm.stdout)
    submitted = [job for job in planned if not job.local and job.outputs]
    pairs = sorted({(dict(job.wildcards)["model"], dict(job.wildcards)["variant"]) for job in submitted
                    if job.rule in GROUPED_RULES})  # fmt: skip
    groups = [f"model_{model}_{variant}_{'_'.join(sorted(GROUPED_RULES))}" for model, variant in pairs]
    assert sorted(jobs.values()) == sorted([job.rule for job in submitted if job.rule not in GROUPED_RULES] + groups)
    assert set(slurm_states(jobs).values()) == {"COMPLETED"}
    # A group asks for its largest member's CPUs and memory (they run one after the other), not their sum.
    (resources,) = [model["resources"] for model in yaml.safe_load(smoke.read_text())["models"].values()]
    for job_id in (job_id for job_id, name in jobs.items() if name in groups):
        granted = scontrol_job(job_id)
        assert granted["NumCPUs"] == str(resources["cpus"]), granted
        assert granted["MinMemoryNode"] == f"{resources['mem_mb']}M", granted
    # One model load per (model, variant), by the one server of its allocation; today each job loaded it.
    loads = model_loads(tmp_path / "slurm")
    assert sorted(loads) == pairs
    assert loads == {pair: 1 for pair in pairs}, loads
    assert server_starts(tmp_path / "slurm") == len(pairs)
    # ... and the servers ended with their allocations.
    from tunelens.servers import marked_processes, server_dir, server_mark

    mark = server_mark(server_dir(tmp_path / "slurm" / ".tunelens" / "servers"), "")
    deadline = time.monotonic() + 10
    while marked_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert marked_processes(mark) == []

    assert local.returncode == 0, local.stdout[-6000:]
    assert "submitted with SLURM jobid" not in local.stdout
    on_slurm, on_local = comparable_results(tmp_path / "slurm"), comparable_results(tmp_path / "local")
    assert "summary.csv" in on_local
    assert any(name.startswith("generations/") for name in on_local)
    assert any(name.startswith("scores/") for name in on_local)
    assert on_slurm == on_local

    # A partial rerun under the grouping profile plans the stale job and its readers only, not the other jobs
    # of its group: nothing after the run, one generation redone (docs/cluster.md) -> it, its score, aggregates.
    assert dry_run(tmp_path / "slurm", smoke, "--profile", "profiles/slurm-local")[0] == []
    stale = next(job for job in submitted if job.rule == "generate")
    rerun, _ = dry_run(tmp_path / "slurm", smoke, "--profile", "profiles/slurm-local", "--forcerun", stale.outputs[0])
    assert {job.key for job in rerun} == {stale.key, job("score", **dict(stale.wildcards))} | AGGREGATES
    print(f"smoke study under SLURM ({len(jobs)} SLURM jobs, {server_starts(tmp_path / 'slurm')} servers, "
          f"loads {loads}): {slurm_seconds:.0f} s; with the local run side by side: {both_seconds:.0f} s")


@pytest.mark.slurm
def test_slurm_failure_and_timeout_are_reported_without_partial_outputs(failure_and_timeout_run):
    result = failure_and_timeout_run.result()
    tmp_path = failure_and_timeout_run.workdir
    assert result.returncode != 0
    assert re.search(r"SLURM-job '\d+' failed, SLURM status is: 'FAILED'", result.stdout), result.stdout[-4000:]
    assert re.search(r"SLURM-job '\d+' failed, SLURM status is: 'TIMEOUT'", result.stdout), result.stdout[-4000:]
    # What SLURM said about the run's jobs the moment it ended (BackgroundRun).
    assert sorted(failure_and_timeout_run.jobs.values()) == ["fails", "times_out"]  # rule-level retries: 0
    assert sorted(failure_and_timeout_run.states.values()) == ["FAILED", "TIMEOUT"]
    # Both wrote a partial output before dying; Snakemake removed it.
    assert not (tmp_path / "fails.txt").exists()
    assert not (tmp_path / "times_out.txt").exists()


# =========================================================================================== partial reruns
# Two embedded models (nothing is loaded: the dry runs only need the registry), two named decoding configs.
PARTIAL_CONFIG = {
    "seed": 1234,
    "device": "cpu",
    "dataset": {"name": "demo", "source": "embedded:demo", "test_size": 6},
    "models": {
        "smollm2": {"source": "embedded:smollm2-135m-instruct", "prompt_format": "chat"},
        "gemma3": {"source": "embedded:gemma3-270m"},
    },
    "decoding": {
        "mode": "list",
        "configs": [{"name": "greedy", "temperature": 0.0}, {"name": "sampled", "temperature": 0.8}],
    },
    "probe": {"layers": [0.5, 1.0]},
}
# Jobs that read every generation or score file: they rerun whenever any of those changes.
AGGREGATES = {("human_sheet", ()), ("report", ()), ("all", ())}


def job(rule: str, **wildcards) -> tuple:
    return (rule, tuple(sorted(wildcards.items())))


def probe_layers_of(config: dict, model: str) -> list[int]:
    import copy

    from tunelens.config import load_config

    return load_config(copy.deepcopy(config)).models[model].probe_layers


def variant_jobs(config: dict, model: str, variant: str, decoding_configs) -> set:
    """Every job of one (model, variant) below the fine-tune: generations and their scores for
    `decoding_configs`, perplexity, logit lens, early exit per probe layer and its scores."""
    jobs = {job("perplexity", model=model, variant=variant), job("logit_lens", model=model, variant=variant)}
    for name in decoding_configs:
        jobs |= {job("generate", model=model, variant=variant, decoding=name),
                 job("score", model=model, variant=variant, decoding=name)}  # fmt: skip
    for layer in probe_layers_of(config, model):
        jobs |= {job("early_exit", model=model, variant=variant, layer=str(layer)),
                 job("score_early_exit", model=model, variant=variant, layer=str(layer))}  # fmt: skip
    return jobs


def model_jobs(config: dict, model: str) -> set:
    """Every job of one model: materialisation, fine-tune, both variants."""
    names = [entry["name"] for entry in config["decoding"]["configs"]]
    return (
        {job("materialize_model", model=model), job("finetune", model=model)}
        | variant_jobs(config, model, "base", names)
        | variant_jobs(config, model, "finetuned", names)
    )


def planned(workdir: Path, config: dict, *args: str) -> set:
    configfile = workdir.parent / f"{workdir.name}-config.yaml"
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    jobs, _ = dry_run(workdir, configfile, *args)
    keys = [planned_job.key for planned_job in jobs]
    assert len(keys) == len(set(keys)), f"a job was listed twice: {keys}"
    return set(keys)


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """A workdir where PARTIAL_CONFIG's whole study looks finished (faked outputs + metadata)."""
    workdir = tmp_path_factory.mktemp("finished") / "work"
    workdir.mkdir()
    configfile = workdir.parent / "config.yaml"
    configfile.write_text(yaml.safe_dump(PARTIAL_CONFIG, sort_keys=False))
    faked = fake_finished_study(workdir, configfile)
    assert len(faked) > 40
    return workdir


def test_fresh_study_plans_every_job(tmp_path):
    expected = (
        {job("split"), job("materialize_bertscore_model")}
        | model_jobs(PARTIAL_CONFIG, "smollm2")
        | model_jobs(PARTIAL_CONFIG, "gemma3")
        | AGGREGATES
    )
    assert planned(tmp_path / "work", PARTIAL_CONFIG) == expected


def test_finished_study_plans_nothing(finished_study):
    assert planned(finished_study, PARTIAL_CONFIG) == set()


def test_one_model_by_config_override_runs_only_that_model(tmp_path):
    """A fresh workdir, the config narrowed to one model (what `--config models=...` does)."""
    only_gemma = {**PARTIAL_CONFIG, "models": {"gemma3": PARTIAL_CONFIG["models"]["gemma3"]}}
    expected = {job("split"), job("materialize_bertscore_model")} | model_jobs(only_gemma, "gemma3") | AGGREGATES
    assert planned(tmp_path / "work", only_gemma) == expected


def test_one_model_by_target_path_runs_only_its_upstream(tmp_path):
    target = "results/scores/gemma3/finetuned/greedy.json"
    assert planned(tmp_path / "work", PARTIAL_CONFIG, target) == {
        job("split"),
        job("materialize_bertscore_model"),
        job("materialize_model", model="gemma3"),
        job("finetune", model="gemma3"),
        job("generate", model="gemma3", variant="finetuned", decoding="greedy"),
        job("score", model="gemma3", variant="finetuned", decoding="greedy"),
    }


def test_adding_a_model_runs_only_its_jobs_and_the_aggregates(finished_study):
    config = {**PARTIAL_CONFIG, "models": {**PARTIAL_CONFIG["models"],
              "smollm2-b": {"source": "embedded:smollm2-135m-instruct", "prompt_format": "alpaca"}}}  # fmt: skip
    assert planned(finished_study, config) == model_jobs(config, "smollm2-b") | AGGREGATES


def test_changing_one_named_decoding_config_reruns_its_generations_scores_and_aggregates(finished_study):
    config = {**PARTIAL_CONFIG, "decoding": {**PARTIAL_CONFIG["decoding"],
              "configs": [{"name": "greedy", "temperature": 0.0, "repetition_penalty": 1.2},
                          {"name": "sampled", "temperature": 0.8}]}}  # fmt: skip
    expected = set(AGGREGATES)
    for model in PARTIAL_CONFIG["models"]:
        for variant in ("base", "finetuned"):
            expected |= {job("generate", model=model, variant=variant, decoding="greedy"),
                         job("score", model=model, variant=variant, decoding="greedy")}  # fmt: skip
    assert planned(finished_study, config) == expected


def test_adding_an_unnamed_decoding_config_runs_only_it_and_the_aggregates(finished_study):
    config = {**PARTIAL_CONFIG, "decoding": {**PARTIAL_CONFIG["decoding"],
              "configs": [*PARTIAL_CONFIG["decoding"]["configs"], {"top_k": 10, "temperature": 0.8}]}}  # fmt: skip
    new = "top_k_10_num_beams_1_temp_0.8"
    expected = set(AGGREGATES)
    for model in PARTIAL_CONFIG["models"]:
        for variant in ("base", "finetuned"):
            expected |= {job("generate", model=model, variant=variant, decoding=new),
                         job("score", model=model, variant=variant, decoding=new)}  # fmt: skip
    assert planned(finished_study, config) == expected


def test_forcerun_one_models_finetune_reruns_its_finetuned_variant_only(finished_study):
    names = [entry["name"] for entry in PARTIAL_CONFIG["decoding"]["configs"]]
    expected = (
        {job("finetune", model="smollm2")}
        | variant_jobs(PARTIAL_CONFIG, "smollm2", "finetuned", names)
        | AGGREGATES
    )
    assert planned(finished_study, PARTIAL_CONFIG, "--forcerun", "results/finetune/smollm2/adapter") == expected


def test_forcerun_the_finetune_rule_reruns_every_finetuned_variant(finished_study):
    names = [entry["name"] for entry in PARTIAL_CONFIG["decoding"]["configs"]]
    expected = set(AGGREGATES)
    for model in PARTIAL_CONFIG["models"]:
        expected |= {job("finetune", model=model)} | variant_jobs(PARTIAL_CONFIG, model, "finetuned", names)
    assert planned(finished_study, PARTIAL_CONFIG, "--forcerun", "finetune") == expected


# =========================================================================================== evaluation sets
def write_eval_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def eval_rows(tag: str, n: int = 5) -> list[dict]:
    return [{"instruction": f"{tag} task {i}", "input": "", "output": f"{tag} answer {i}"} for i in range(n)]


def evalset_jobs(config: dict, evalset: str) -> set:
    """Every job of one evaluation set: its rows, generation + score per (model, variant, decoding config),
    perplexity per (model, variant) and its human sheet. Never a fine-tune, a split or a probe job."""
    names = [entry["name"] for entry in config["decoding"]["configs"]]
    jobs = {job("evalset", evalset=evalset), job("human_sheet_evalset", evalset=evalset)}
    for model in config["models"]:
        for variant in ("base", "finetuned"):
            jobs.add(job("perplexity_evalset", evalset=evalset, model=model, variant=variant))
            for name in names:
                jobs |= {job("generate_evalset", evalset=evalset, model=model, variant=variant, decoding=name),
                         job("score_evalset", evalset=evalset, model=model, variant=variant, decoding=name)}  # fmt: skip
    return jobs


REPORT_ONLY = {("report", ()), ("all", ())}


@pytest.fixture(scope="module")
def finished_study_with_sets(tmp_path_factory):
    """A finished study of PARTIAL_CONFIG plus two evaluation sets read from local files."""
    root = tmp_path_factory.mktemp("finished_sets")
    workdir = root / "work"
    workdir.mkdir()
    config = {**PARTIAL_CONFIG, "evaluation_sets": [
        {"name": "alpha", "source": write_eval_rows(root / "alpha.jsonl", eval_rows("alpha"))},
        {"name": "beta", "source": write_eval_rows(root / "beta.jsonl", eval_rows("beta"))},
    ]}  # fmt: skip
    configfile = root / "config.yaml"
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    fake_finished_study(workdir, configfile)
    return workdir, config


def test_fresh_study_with_an_evaluation_set_plans_its_jobs_once(tmp_path):
    config = {**PARTIAL_CONFIG, "evaluation_sets": [
        {"name": "alpha", "source": write_eval_rows(tmp_path / "alpha.jsonl", eval_rows("alpha"))}]}  # fmt: skip
    expected = (
        {job("split"), job("materialize_bertscore_model")}
        | model_jobs(config, "smollm2")
        | model_jobs(config, "gemma3")
        | AGGREGATES
        | evalset_jobs(config, "alpha")
    )
    assert planned(tmp_path / "work", config) == expected


def test_adding_an_evaluation_set_runs_only_its_jobs_and_the_report(finished_study, tmp_path):
    """No fine-tune, no split, no default-set job (the default human sheet stays) reruns."""
    config = {**PARTIAL_CONFIG, "evaluation_sets": [
        {"name": "code", "source": write_eval_rows(tmp_path / "code.jsonl", eval_rows("code")), "kind": "code"}]}  # fmt: skip
    assert planned(finished_study, config) == evalset_jobs(config, "code") | REPORT_ONLY


def test_finished_study_with_evaluation_sets_plans_nothing(finished_study_with_sets):
    workdir, config = finished_study_with_sets
    assert planned(workdir, config) == set()


def test_changing_one_evaluation_sets_rows_reruns_only_that_set(finished_study_with_sets, tmp_path):
    workdir, config = finished_study_with_sets
    beta = Path(config["evaluation_sets"][1]["source"])
    original = beta.read_text()
    try:
        write_eval_rows(beta, eval_rows("beta", n=6))
        assert planned(workdir, config) == evalset_jobs(config, "beta") | REPORT_ONLY
    finally:
        beta.write_text(original)


def test_changing_one_evaluation_sets_settings_reruns_only_that_set(finished_study_with_sets):
    workdir, config = finished_study_with_sets
    alpha, beta = config["evaluation_sets"]
    changed = {**config, "evaluation_sets": [{**alpha, "max_rows": 3}, beta]}
    assert planned(workdir, changed) == evalset_jobs(config, "alpha") | REPORT_ONLY
    # kind only changes how the set is scored: its scores and the report rerun, not its generations
    changed = {**config, "evaluation_sets": [alpha, {**beta, "kind": "code"}]}
    scores = {key for key in evalset_jobs(config, "beta") if key[0] == "score_evalset"}
    assert planned(workdir, changed) == scores | REPORT_ONLY
