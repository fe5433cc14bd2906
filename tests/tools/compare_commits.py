"""Behaviour-unchanged check between two versions of tunelens (a developer tool; pytest does not collect it).

    /work/main/.venv/bin/python tests/tools/compare_commits.py                      # base ac7cc8c vs the working tree
    .venv/bin/python tests/tools/compare_commits.py --base main --head HEAD        # two commits
    .venv/bin/python tests/tools/compare_commits.py --base ac7cc8c --only base     # compute and cache the base only
    .venv/bin/python tests/tools/compare_commits.py --base X --head X --repeat     # determinism: two runs of one side
    .venv/bin/python tests/tools/compare_commits.py --steps plans,fixtures         # skip the smoke run and rerun check

Each side is materialised (a commit: `git worktree add --detach` under the cache; the working tree: used as is)
and run with the SAME Python (this interpreter; its snakemake), with PYTHONPATH set to the side's root so the
side's own tunelens is imported. The steps (--steps, all by default):

  plans     `snakemake --dry-run --printshellcmds` from an empty workdir for every preset (config.yaml and
            configs/*.yaml, hub on as tests/test_workflow.py does, gpu-study stand-ins as tests/conftest.py
            writes them) with no profile and with each profile of profiles/ (local, slurm, slurm-local: a dry run
            needs no cluster). Every planned job is listed with its rule, group, wildcards, input, output, log,
            benchmark, priority, threads and resources (jobid, reason and timestamps are dropped), sorted; plus
            the job-count table. Compared as text.
  smoke     the smoke study (configs/smoke.yaml: "smallest end-to-end run", CI and the SLURM test) run to the end
            (`snakemake --cores N`); results/report/summary.csv and every png/svg/pdf under results/ compared
            byte for byte; every other file under results/ is compared too and listed (informational).
            --studies smoke,default adds the embedded default config.yaml (`make run`, ~11 min on 2 cores).
  fixtures  the studies the test suite builds without models: tests/test_report.py's build_study (score files
            with known numbers for 2 models x 2 variants x 3 decoding configs, judge, 2 probe layers,
            fine-tune metrics) rendered by the side's own write_report (through the side's own tests/test_report.py
            helpers `build_study` and `run`, so a refactor that changes their signature stays comparable), in two
            shapes: "report-full" (the module fixture `full`) and "report-minimal" (one model, base only, no
            judge, no layers). summary.csv/summary.md/summary.html and plots compared byte for byte. And
            "alpaca-run", tests/test_alpaca_run.py's whole Snakemake run (the tests' tiny random Llama, built
            once and shared by both sides; a local Alpaca file with a BOM, malformed and over-long rows; the
            LLM judge; ~1-2 min): the one cheap end-to-end study on a local dataset and model with the judge,
            which the smoke study does not cover. Its results/ are compared like the smoke study's.
  rerun     the pure-move check: base's finished smoke workdir (results/, logs/, benchmarks/, .snakemake/
            metadata, mtimes kept) is copied and head's Snakefile is dry-run on it: it must plan nothing.
            Otherwise the planned jobs and their reasons are listed, with the files `--list-changes params|input`
            names for head beyond those it names for base on the same copy (it names some on any checkout).
            Checked: a comment-only edit of tunelens/report/provenance.py plans nothing; a one-string edit in
            its provenance_section plans exactly `report`.

Outputs are cached per side under --cache (default /tmp/tunelens-compare): a commit under <commit12>/, the working
tree under worktree-<tree12>/ (the tree hash of its tracked and untracked-not-ignored files), so the base is
computed once. --fresh recomputes. Nondeterminism: --repeat runs the smoke study and the fixtures of a side a
second time and records every file (and, for CSV files, every column) that differs between the two runs in
<side>/nondeterministic.json; later comparisons report those files/columns separately and compare the rest.
Differences in other results files (score JSONs, sidecars, summary.md) beyond that noise are printed as warnings:
summary.md, for one, names the git commit. Every run gets PYTHONHASHSEED=0 (see OFFLINE below).
Exit status: 0 when the plans, summary.csv and the plots are identical (modulo recorded nondeterminism) and
nothing reruns; 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import filecmp
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This tree's test helpers, the same for both sides so that both plan and run against the same files: the gpu-study
# stand-ins (tests/conftest.py) and tests/test_alpaca_run.py's study.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import gpu_study_standins  # noqa: E402
from test_alpaca_run import alpaca_run_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BASE = "ac7cc8c"
DEFAULT_CACHE = Path(os.environ.get("TUNELENS_COMPARE_CACHE", "/tmp/tunelens-compare"))
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
           # Python's string hashing is randomised per process: Snakemake prints a job's resources in set order
           # and PEFT writes adapter_config.json's target_modules in set order. One seed on every side and run.
           "PYTHONHASHSEED": "0"}
HUB_ON = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}  # as tests/test_workflow.py: nothing is downloaded
PROFILE_ENV = {"TUNELENS_SLURM_PARTITION": "gpu-probe"}  # as tests/test_profiles.py
PLOT_SUFFIXES = {".png", ".svg", ".pdf"}
STEPS = ("plans", "smoke", "fixtures", "rerun")
# JSON fields that measure the run rather than its results (timings, PIDs, memory, a generation server's request
# counter, a hash over a directory holding a timing): never a behaviour difference.
VOLATILE = re.compile(r"(_s|_seconds|_per_s|_pid|\.request|rss_mib?|rss_mb|sha256)$|^metric_time_s\.|\.metric_time_s\.")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def git(*args: str, cwd: Path = REPO, env: dict | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}).stdout.strip()


# ------------------------------------------------------------------------------------------------ sides
class Side:
    """One version of the repository: its source root and its cache directory."""

    def __init__(self, spec: str, cache: Path):
        self.spec = spec
        if spec == "worktree":
            self.root = REPO
            with tempfile.TemporaryDirectory() as tmp:
                index = Path(tmp) / "index"
                real_index = Path(git("rev-parse", "--path-format=absolute", "--git-path", "index"))
                if real_index.exists():
                    shutil.copy(real_index, index)
                env = {"GIT_INDEX_FILE": str(index)}
                git("add", "-A", cwd=REPO, env=env)
                tree = git("write-tree", cwd=REPO, env=env)
            self.label = f"worktree-{tree[:12]}"
            self.commit = None
        else:
            self.commit = git("rev-parse", "--verify", f"{spec}^{{commit}}")
            self.label = self.commit[:12]
            self.root = cache / self.label / "src"
        self.dir = cache / self.label
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.commit and not (self.root / "Snakefile").exists():
            if self.root.exists():
                shutil.rmtree(self.root)
            git("worktree", "prune")
            log(f"git worktree add --detach {self.root} {self.commit[:12]}")
            git("worktree", "add", "--detach", str(self.root), self.commit)
        meta = {"spec": spec, "commit": self.commit or git("rev-parse", "HEAD"), "root": str(self.root),
                "dirty": spec == "worktree" and bool(git("status", "--porcelain"))}
        (self.dir / "side.json").write_text(json.dumps(meta, indent=1) + "\n")

    def env(self, extra: dict | None = None) -> dict:
        env = {**os.environ, **OFFLINE, **(extra or {})}
        env["PYTHONPATH"] = str(self.root)
        env.pop("VIRTUAL_ENV", None)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        return env

    def snakemake(self, workdir: Path, *args: str, env: dict | None = None, timeout: int = 3600,
                  nice: int = 10) -> subprocess.CompletedProcess:
        command = [*SNAKEMAKE, "--snakefile", str(self.root / "Snakefile"), "--directory", str(workdir), *args]
        if nice:
            command = ["nice", "-n", str(nice), *command]
        return subprocess.run(command, cwd=self.root, capture_output=True, text=True, timeout=timeout,
                              env=self.env(env))

    def __str__(self) -> str:
        return f"{self.spec} ({self.label}, {self.root})"


def done(path: Path) -> bool:
    return (path / ".done").exists()


def mark_done(path: Path, seconds: float, **extra) -> None:
    (path / ".done").write_text(json.dumps({"seconds": round(seconds, 1), **extra}) + "\n")


def reset(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# ------------------------------------------------------------------------------------------------ plans
_JOB = re.compile(r"^(\s*)(local)?rule (\S+):$")
_FIELD = re.compile(r"^\s+(\w+): (.*)$")
_GROUP = re.compile(r"Group job (\S+)")
DROPPED_FIELDS = {"jobid", "reason"}


def parse_plan(text: str, keep_reason: bool = False) -> tuple[list[str], list[dict]]:
    """The job-count table and the jobs of a `snakemake --dry-run` output."""
    lines = text.splitlines()
    counts: list[str] = []
    if "Job stats:" in lines:
        for line in lines[lines.index("Job stats:") + 3:]:
            if not line.strip():
                break
            counts.append(" ".join(line.split()))
    jobs, current, group = [], None, None
    for line in lines:
        grouped = _GROUP.search(line)
        if grouped:
            group = grouped.group(1)
            continue
        header = _JOB.match(line)
        if header:
            current = {"rule": ("localrule " if header.group(2) else "rule ") + header.group(3),
                       "group": group if header.group(1) else None, "fields": {}}
            jobs.append(current)
            continue
        if current is not None:
            field = _FIELD.match(line)
            if field and line.startswith(" "):
                key, value = field.groups()
                if keep_reason or key not in DROPPED_FIELDS:
                    current["fields"][key] = value
            elif line.startswith("Shell command:"):
                current["fields"]["shell"] = line.split(":", 1)[1].strip()
            else:
                current = None
    return counts, jobs


def render_jobs(jobs: list[dict]) -> list[str]:
    blocks = []
    for job in jobs:
        head = job["rule"] + (f"  [group {job['group']}]" if job["group"] else "")
        fields = dict(job["fields"])
        if "resources" in fields:  # printed in set order (by Snakemake, whatever the hash seed)
            fields["resources"] = ", ".join(sorted(fields["resources"].split(", ")))
        body = [f"    {key}: {value}" for key, value in sorted(fields.items())]
        blocks.append("\n".join([head, *body]))
    return sorted(blocks)


def presets(side: Side) -> list[str]:
    return ["config.yaml", *sorted(f"configs/{p.name}" for p in (side.root / "configs").glob("*.yaml"))]


def profiles(side: Side) -> list[str]:
    return sorted(p.name for p in (side.root / "profiles").iterdir()
                  if (p / "config.yaml").exists() and p.name != "default")


def compute_plans(side: Side, fresh: bool, run: str = "plans") -> Path:
    out = side.dir / run
    if done(out) and not fresh:
        return out
    reset(out)
    started = time.perf_counter()
    for preset in presets(side):
        for profile in [None, *profiles(side)]:
            name = preset.replace("/", "__").removesuffix(".yaml") + (f"@{profile}" if profile else "")
            with tempfile.TemporaryDirectory(prefix="tunelens-plan-") as tmp:
                workdir = Path(tmp)
                if preset.endswith("gpu-study.yaml"):
                    gpu_study_standins(workdir)
                args = ["--dry-run", "--printshellcmds", "--configfile", str(side.root / preset)]
                if profile:
                    args += ["--profile", str(side.root / "profiles" / profile)]
                result = side.snakemake(workdir, *args, env={**HUB_ON, **PROFILE_ENV}, timeout=600)
            text = result.stdout + result.stderr
            (out / f"{name}.raw.txt").write_text(text.replace(str(side.root), "<ROOT>"))
            if result.returncode != 0:
                body = f"DRY RUN FAILED (exit {result.returncode})\n" + "\n".join(text.splitlines()[-30:])
            else:
                counts, jobs = parse_plan(result.stdout)
                body = "\n".join(["jobs:", *counts, "", *render_jobs(jobs)])
            (out / f"{name}.plan.txt").write_text(body.replace(str(side.root), "<ROOT>") + "\n")
            log(f"  plan {name}: {'FAILED' if result.returncode else 'ok'}")
    mark_done(out, time.perf_counter() - started)
    return out


def compare_plans(base: Path, head: Path) -> list[str]:
    problems = []
    names = sorted({p.name for p in base.glob("*.plan.txt")} | {p.name for p in head.glob("*.plan.txt")})
    for name in names:
        a, b = base / name, head / name
        if not a.exists() or not b.exists():
            problems.append(f"plan {name}: only on {'head' if b.exists() else 'base'}")
            continue
        ta, tb = a.read_text(), b.read_text()
        if ta.startswith("DRY RUN FAILED") or tb.startswith("DRY RUN FAILED"):
            problems.append(f"plan {name}: dry run failed on " + " and ".join(
                side for side, text in (("base", ta), ("head", tb)) if text.startswith("DRY RUN FAILED")))
        if ta != tb:
            import difflib

            diff = list(difflib.unified_diff(ta.splitlines(), tb.splitlines(), "base", "head", lineterm="", n=1))
            problems.append(f"plan {name}: differs ({len(diff)} diff lines)\n    " + "\n    ".join(diff[:40]))
    log(f"plans: {len(names)} compared, {len(problems)} differ")
    return problems


# ------------------------------------------------------------------------------------------------ studies
def run_study(side: Side, name: str, config: str, dest: Path, cores: int) -> float:
    workdir = reset(dest)
    started = time.perf_counter()
    result = side.snakemake(workdir, "--cores", str(cores), "--configfile", str(side.root / config),
                            timeout=3 * 3600)
    seconds = time.perf_counter() - started
    (dest.parent / f"{dest.name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{name} on {side} failed (exit {result.returncode}); see {dest.parent / dest.name}.log\n"
                         + (result.stdout + result.stderr)[-3000:])
    mark_done(workdir, seconds, config=config, cores=cores)
    log(f"  study {name} on {side.label}: {seconds:.0f} s")
    return seconds


STUDY_CONFIGS = {"smoke": "configs/smoke.yaml", "default": "config.yaml"}


def compute_study(side: Side, name: str, run: str, fresh: bool, cores: int) -> Path:
    dest = side.dir / "studies" / name / run
    if not done(dest) or fresh:
        run_study(side, name, STUDY_CONFIGS[name], dest, cores)
    return dest


FIXTURE_SCRIPT = r"""
import sys
from pathlib import Path
sys.path.insert(0, "tests")
import test_report as t
root = Path(sys.argv[2])
if sys.argv[1] == "report-full":
    files = t.build_study(root)
else:
    files = t.build_study(root, models=("smol",), judge=False, layers=(), finetune=False)
t.run(root, files)
"""
FIXTURES = ("report-full", "report-minimal", "alpaca-run")

TINY_LLAMA_SCRIPT = r"""
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from transformers import AutoTokenizer
import conftest
from tunelens.models import EMBEDDED_MODELS, _module_dir
out = Path(sys.argv[1])
entry = EMBEDDED_MODELS["smollm2-135m-instruct"]
tokenizer = AutoTokenizer.from_pretrained(_module_dir(entry), gguf_file=entry["gguf"])
tokenizer.save_pretrained(out / "tokenizer")
conftest._build_tiny(out / "model", out / "tokenizer", "llama", 4)
"""


def tiny_llama(side: Side, cache: Path) -> Path:
    """The tests' tiny random Llama (tests/conftest.py), built once and shared by every side: an input, not code
    under test."""
    out = cache / "fixture-inputs" / "tiny_llama"
    if not done(out):
        reset(out)
        result = subprocess.run(["nice", "-n", "10", sys.executable, "-c", TINY_LLAMA_SCRIPT, str(out)],
                                cwd=side.root, capture_output=True, text=True, timeout=1800, env=side.env())
        if result.returncode != 0:
            raise SystemExit(f"building the tiny Llama failed:\n{result.stderr[-3000:]}")
        mark_done(out, 0, built_by=side.label)
    return out / "model"


def compute_fixture(side: Side, name: str, run: str, fresh: bool) -> Path:
    dest = side.dir / "fixtures" / name / run
    if done(dest) and not fresh:
        return dest
    reset(dest)
    started = time.perf_counter()
    if name == "alpaca-run":
        import yaml

        model = tiny_llama(side, side.dir.parent)
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'tests'); import test_alpaca_run as t; "
                        "from pathlib import Path; t.alpaca_file(Path(sys.argv[1]))", str(dest / "alpaca_data.jsonl")],
                       cwd=side.root, check=True, env=side.env(), capture_output=True)
        config = alpaca_run_config(model)
        (dest / "study.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        result = side.snakemake(dest, "--cores", "1", "--configfile", str(dest / "study.yaml"), timeout=1800)
        (dest.parent / f"{run}.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise SystemExit(f"fixture {name} on {side} failed; see {dest.parent / run}.log\n"
                             + (result.stdout + result.stderr)[-3000:])
        mark_done(dest, time.perf_counter() - started)
        log(f"  fixture {name} on {side.label}: {time.perf_counter() - started:.0f} s")
        return dest
    result = subprocess.run(["nice", "-n", "10", sys.executable, "-c", FIXTURE_SCRIPT, name, str(dest)],
                            cwd=side.root, capture_output=True, text=True, timeout=1800,
                            env=side.env({"MPLBACKEND": "Agg"}))
    if result.returncode != 0:
        raise SystemExit(f"fixture {name} on {side} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    mark_done(dest, time.perf_counter() - started)
    log(f"  fixture {name} on {side.label}: {time.perf_counter() - started:.0f} s")
    return dest


# ------------------------------------------------------------------------------------------------ file trees
def files_under(root: Path, sub: str) -> dict[str, Path]:
    base = root / sub if sub else root
    if not base.exists():
        return {}
    return {str(p.relative_to(root)): p for p in sorted(base.rglob("*")) if p.is_file() and p.name != ".done"}


def read_csv_rows(path: Path) -> list[list[str]] | None:
    try:
        return list(csv.reader(io.StringIO(path.read_text())))
    except (UnicodeDecodeError, csv.Error):
        return None


def mask(row: list[str], header: list[str], columns) -> str:
    """A row as a JSON list, the cells of `columns` replaced by '*' (the key of a differing row)."""
    return json.dumps(["*" if name in columns else value for name, value in zip(header, row)])


def csv_cells_differing(a: Path, b: Path) -> dict[str, list[str]] | None:
    """The rows whose cells differ between two CSV files of one header and row count, as {row with the
    differing cells masked as '*': [differing columns]}; None when the files are not comparable row by row."""
    ra, rb = read_csv_rows(a), read_csv_rows(b)
    if not ra or not rb or ra[0] != rb[0] or len(ra) != len(rb):
        return None
    header, cells = ra[0], {}
    for row_a, row_b in zip(ra[1:], rb[1:]):
        if len(row_a) != len(header) or len(row_b) != len(header):
            return None
        columns = [name for name, x, y in zip(header, row_a, row_b) if x != y]
        if columns:
            cells[mask(row_a, header, columns)] = columns
    return cells


# summary.csv's rows of job costs (statistic column): their value is a measurement of this run, not a result.
TIMING_STATISTIC = "compute_cost"


def csv_unexplained(cells: dict[str, list[str]], noisy: dict[str, list[str]], a: Path) -> list[str]:
    """The differing rows of `cells` (base vs head) that no nondeterministic row of `noisy` explains: a row is
    explained when its differing columns are among a noisy row's and the row, masked like it, is that row."""
    header = read_csv_rows(a)[0]
    column_sets = {tuple(columns) for columns in noisy.values()}
    unexplained = []
    for key, columns in cells.items():
        row = json.loads(key)  # masked only where base and head differ; re-mask with each noisy column set
        if TIMING_STATISTIC in row and columns == ["value"]:
            continue  # a timing (wall, CPU, memory) is never reproducible, whether or not two base runs differed
        explained = False
        for noisy_columns in column_sets:
            if set(columns) <= set(noisy_columns) and len(row) == len(header):
                if mask(row, header, noisy_columns) in noisy:
                    explained = True
                    break
        if not explained:
            unexplained.append(key)
    return unexplained


def results_sub(kind: str, name: str) -> str:
    """What is compared: a Snakemake run's results/, a report fixture's whole output."""
    return "results" if kind == "studies" or name == "alpaca-run" else ""


def is_key_file(rel: str) -> bool:
    return Path(rel).name == "summary.csv" or Path(rel).suffix in PLOT_SUFFIXES


def diff_trees(a_root: Path, b_root: Path, sub: str) -> dict:
    a, b = files_under(a_root, sub), files_under(b_root, sub)
    result = {"only_base": sorted(set(a) - set(b)), "only_head": sorted(set(b) - set(a)), "differ": {},
              "same": 0}
    for rel in sorted(set(a) & set(b)):
        if filecmp.cmp(a[rel], b[rel], shallow=False):
            result["same"] += 1
        else:
            if rel.endswith(".csv"):
                result["differ"][rel] = csv_cells_differing(a[rel], b[rel])
            elif rel.endswith((".json", ".jsonl")):
                paths = json_paths_differing(a[rel], b[rel])
                result["differ"][rel] = None if paths is None else {"json_paths": paths}
            else:
                result["differ"][rel] = None
    return result


def read_json_any(path: Path):
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]  # JSON lines


def json_paths_differing(a: Path, b: Path) -> list[str] | None:
    """The key paths (list indices as []) whose values differ between two JSON (or JSON-lines) files; a path
    whose keys or lengths differ counts as a whole. None when a file is not JSON."""
    try:
        ja, jb = read_json_any(a), read_json_any(b)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    paths: set[str] = set()

    def walk(x, y, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict) and x.keys() == y.keys():
            for key in x:
                walk(x[key], y[key], f"{path}.{key}" if path else str(key))
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for u, v in zip(x, y):
                walk(u, v, f"{path}[]")
        elif x != y:
            paths.add(path or "<root>")

    walk(ja, jb, "")
    return sorted(paths)


def determinism(side: Side, kind: str, name: str, run1: Path, run2: Path) -> dict:
    """Record what differs between two runs of the same side (files; columns of CSV files)."""
    path = side.dir / "nondeterministic.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    diff = diff_trees(run1, run2, results_sub(kind, name))
    record[f"{kind}/{name}"] = {"differ": diff["differ"], "only_run1": diff["only_base"],
                                "only_run2": diff["only_head"], "same": diff["same"]}
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    key = {rel: (f"{len(cells)} rows, columns {sorted({c for cols in cells.values() for c in cols})}, e.g. "
                 f"{list(cells)[:2]}" if cells else "whole file") for rel, cells in diff["differ"].items()
           if is_key_file(rel)}
    json_paths = sorted({path for cells in diff["differ"].values() if isinstance(cells, dict)
                         for path in cells.get("json_paths", [])})
    if json_paths:
        log(f"  JSON fields that differ between the two runs: {json_paths}")
    log(f"determinism {kind}/{name} on {side.label}: {len(diff['differ'])} of {len(diff['differ']) + diff['same']} "
        f"files differ between two runs ({sorted(diff['differ'])}); summary.csv/plots among them: {key or 'none'}")
    return record[f"{kind}/{name}"]


def nondeterministic(side: Side, kind: str, name: str) -> dict:
    path = side.dir / "nondeterministic.json"
    return (json.loads(path.read_text()) if path.exists() else {}).get(f"{kind}/{name}", {}).get("differ", {})


def compare_outputs(kind: str, name: str, base_dir: Path, head_dir: Path,
                    noisy: dict) -> tuple[list[str], list[str], list[str]]:
    """(problems: summary.csv and plots; warnings: other results files differing beyond what differs between
    two runs of one commit, e.g. scores JSON values; notes: differences that are run-to-run noise)."""
    diff = diff_trees(base_dir, head_dir, results_sub(kind, name))
    problems, warnings, notes = [], [], []
    for rel in diff["only_base"] + diff["only_head"]:
        side = "base" if rel in diff["only_base"] else "head"
        (problems if is_key_file(rel) else warnings).append(f"{rel}: only on {side}")
    for rel, cells in diff["differ"].items():
        where = problems if is_key_file(rel) else warnings
        if isinstance(cells, dict) and "json_paths" in cells:
            # a field that differed between two runs in any file of the study is noise in every file, and so is
            # one named like a timing, a PID or a server's request counter (equal in two runs by chance)
            known = {path for entry in noisy.values() if isinstance(entry, dict)
                     for path in entry.get("json_paths", [])}
            unexplained = [path for path in cells["json_paths"] if path not in known and not VOLATILE.search(path)]
            if unexplained:
                where.append(f"{rel}: differs at {unexplained[:12]} (fields that do not differ between two runs "
                             "of one commit)")
            else:
                notes.append(f"{rel}: differs only at the nondeterministic {cells['json_paths'][:12]}")
            continue
        if rel in noisy:
            known = noisy[rel]
            if cells is not None and known is not None and "json_paths" not in known:
                unexplained = csv_unexplained(cells, known, base_dir / rel)
                if not unexplained:
                    notes.append(f"{rel}: differs only in the {len(cells)} rows' cells that differ between two runs "
                                 f"of one commit (columns {sorted({c for cs in known.values() for c in cs})})")
                else:
                    where.append(f"{rel}: {len(unexplained)} rows differ beyond the nondeterministic cells, e.g. "
                                 + "; ".join(unexplained[:5]))
                continue
            notes.append(f"{rel}: differs, but it also differs between two runs of one commit (nondeterministic)")
            continue
        detail = f" ({len(cells)} rows, e.g. {'; '.join(list(cells)[:5])})" if cells else ""
        where.append(f"{rel}: differs{detail}")
    for rel, columns in noisy.items():
        if rel not in diff["differ"] and is_key_file(rel):
            notes.append(f"{rel}: identical here, though it differed between two runs of one commit")
    total = diff["same"] + len(diff["differ"])
    log(f"{kind}/{name}: {total} files in both, {diff['same']} identical; summary.csv + plots differing: "
        f"{len(problems)}; other files differing beyond run-to-run noise: {len(warnings)}; noise only: {len(notes)}")
    prefix = f"{kind}/{name}: "
    return [prefix + p for p in problems], [prefix + w for w in warnings], [prefix + n for n in notes]


# ------------------------------------------------------------------------------------------------ rerun check
def rerun_check(base: Side, head: Side, base_study: Path, cache: Path, config: str) -> list[str]:
    work = cache / "rerun" / f"{base.label}__{head.label}"
    if work.exists():
        shutil.rmtree(work)
    work.parent.mkdir(parents=True, exist_ok=True)
    # mtimes and .snakemake metadata kept; .tunelens holds the generation servers' sockets and state, not results
    shutil.copytree(base_study, work, symlinks=True, copy_function=shutil.copy2,
                    ignore=shutil.ignore_patterns(".tunelens", "*.sock"))
    result = head.snakemake(work, "--dry-run", "--configfile", str(head.root / config), timeout=600)
    text = result.stdout + result.stderr
    (work.parent / f"{work.name}.dry-run.txt").write_text(text)
    if result.returncode != 0:
        return [f"rerun: head's dry run on base's results failed (exit {result.returncode}):\n" + text[-2000:]]
    _, jobs = parse_plan(result.stdout, keep_reason=True)
    jobs = [job for job in jobs if job["rule"] != "localrule all" and job["rule"] != "rule all"]
    if not jobs:
        log(f"rerun: head plans nothing on base's finished {config} study")
        return []
    lines = [f"rerun: head would run {len(jobs)} jobs on base's finished {config} study:"]
    for job in jobs:
        lines.append(f"    {job['rule']} {job['fields'].get('wildcards', '')}: {job['fields'].get('reason', '')}")
    # Snakemake's --list-changes lists files even on an unchanged checkout (26 for params on base's own smoke
    # study at ac7cc8c): only what head lists beyond base is shown. Not `code`: it compares script mtimes, which
    # differ between any two checkouts, and the workflow leaves that trigger out (profiles/default/config.yaml;
    # each rule's `code` param, a hash of the code its script reaches, is what reruns a job).
    for change in ("params", "input"):
        listed = {}
        for side in (base, head):
            result = side.snakemake(work, "--list-changes", change, "--configfile", str(side.root / config),
                                    timeout=600)
            listed[side.label] = {line.strip() for line in result.stdout.splitlines()
                                  if re.fullmatch(r"\S+/\S+", line.strip())}
        files = sorted(listed[head.label] - listed[base.label])
        lines.append(f"    --list-changes {change}: {len(files)} files beyond what base itself lists"
                     + "".join(f"\n        {f}" for f in files[:20]))
    log(lines[0])
    return ["\n".join(lines)]


# ------------------------------------------------------------------------------------------------ main
def compute_side(side: Side, steps: set[str], studies: list[str], repeat: bool, fresh: bool, cores: int,
                 is_base: bool = True) -> dict:
    out: dict = {"studies": {}, "fixtures": {}}
    if "plans" in steps:
        started = time.perf_counter()
        out["plans"] = compute_plans(side, fresh)
        log(f"plans on {side.label}: {time.perf_counter() - started:.0f} s")
        if repeat:
            differing = compare_plans(out["plans"], compute_plans(side, fresh, "plans-run2"))
            record_path = side.dir / "nondeterministic.json"
            record = json.loads(record_path.read_text()) if record_path.exists() else {}
            record["plans"] = differing
            record_path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            log(f"determinism plans on {side.label}: {len(differing)} plans differ between two dry runs")
    if "smoke" in steps or ("rerun" in steps and is_base):  # the rerun check reads the base's smoke study
        for name in studies if "smoke" in steps else ["smoke"]:
            out["studies"][name] = compute_study(side, name, "run1", fresh, cores)
            if repeat:
                run2 = compute_study(side, name, "run2", fresh, cores)
                determinism(side, "studies", name, out["studies"][name], run2)
    if "fixtures" in steps:
        for name in FIXTURES:
            out["fixtures"][name] = compute_fixture(side, name, "run1", fresh)
            if repeat:
                determinism(side, "fixtures", name, out["fixtures"][name], compute_fixture(side, name, "run2", fresh))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--base", default=DEFAULT_BASE, help=f"commit-ish (default {DEFAULT_BASE})")
    parser.add_argument("--head", default="worktree", help="commit-ish, or 'worktree' (default: the working tree)")
    parser.add_argument("--only", choices=["base", "head"], help="compute (and cache) one side, compare nothing")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {STEPS}")
    parser.add_argument("--studies", default="smoke", help="comma list of smoke,default (default: smoke)")
    parser.add_argument("--repeat", action="store_true", help="run studies and fixtures twice per side and record "
                        "what differs between the runs (nondeterminism)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--fresh", action="store_true", help="recompute cached outputs")
    parser.add_argument("--verbose", action="store_true", help="list the files that differ only by run-to-run noise")
    args = parser.parse_args(argv)
    steps = set(args.steps.split(","))
    studies = args.studies.split(",")
    assert steps <= set(STEPS) and set(studies) <= set(STUDY_CONFIGS), (steps, studies)
    args.cache.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    base = Side(args.base, args.cache)
    log(f"base: {base}")
    base_out = compute_side(base, steps, studies, args.repeat, args.fresh, args.cores)
    if args.only == "base":
        log(f"base computed and cached in {base.dir} ({time.perf_counter() - started:.0f} s)")
        return 0
    head = Side(args.head, args.cache)
    log(f"head: {head}")
    head_out = compute_side(head, steps, studies, args.repeat and head.label != base.label, args.fresh, args.cores,
                            is_base=False)
    if args.only == "head":
        return 0

    problems, warnings, notes = [], [], []
    if "plans" in steps:
        problems += compare_plans(base_out["plans"], head_out["plans"])
    for kind in ("studies", "fixtures"):
        for name in base_out[kind]:
            if kind == "studies" and "smoke" not in steps:
                continue
            record = base.dir / "nondeterministic.json"
            if f"{kind}/{name}" not in (json.loads(record.read_text()) if record.exists() else {}):
                warnings.append(f"{kind}/{name}: no run-to-run noise recorded for base (run it with --repeat): "
                                "timings (summary.csv's compute_cost rows) will show as differences")
            noisy = nondeterministic(base, kind, name)
            for rel, cells in nondeterministic(head, kind, name).items():
                both = isinstance(cells, dict) and isinstance(noisy.get(rel), dict)
                if both and "json_paths" in cells and "json_paths" in noisy[rel]:
                    noisy[rel] = {"json_paths": sorted(set(noisy[rel]["json_paths"]) | set(cells["json_paths"]))}
                else:
                    noisy[rel] = {**noisy[rel], **cells} if both else (None if rel in noisy else cells)
            p, w, n = compare_outputs(kind, name, base_out[kind][name], head_out[kind][name], noisy)
            problems += p
            warnings += w
            notes += n
    if "rerun" in steps:
        problems += rerun_check(base, head, base_out["studies"]["smoke"], args.cache, STUDY_CONFIGS["smoke"])

    print()
    print(f"base {base.label}  vs  head {head.label}   ({time.perf_counter() - started:.0f} s)")
    for note in notes if args.verbose else []:
        print(f"  noise: {note}")
    if notes and not args.verbose:
        print(f"  ({len(notes)} files differ only where two runs of one commit differ too; --verbose lists them)")
    for warning in warnings:
        print(f"  warning: {warning}")
    for problem in problems:
        print(f"  DIFFERS: {problem}")
    print("IDENTICAL" if not problems else f"{len(problems)} difference(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
