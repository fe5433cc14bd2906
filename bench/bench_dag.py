"""How fast Snakemake plans tunelens DAGs: a ~10,000-job sweep and a no-op rerun of a finished study.

    .venv/bin/python bench/bench_dag.py                       # both, defaults below
    .venv/bin/python bench/bench_dag.py --models 10 --configs 100 --repeat 3
    .venv/bin/python bench/bench_dag.py --only sweep --profile-top 25   # + cProfile of one dry run

1. sweep: a generated config of N hub models (ids + num_layers, so nothing is downloaded or loaded) x
   K decoding configs x {base, finetuned}, judge on; `snakemake --dry-run` from an empty workdir.
2. noop: configs/alpaca-7b.yaml with every output faked (empty files, then `snakemake --touch --forceall`
   records metadata as a real run would); `snakemake --dry-run` and a real `snakemake --cores 1` that
   must find nothing to do.

The helpers (`dry_run`, `parse_dry_run`, `fake_finished_study`) are also used by tests/test_cluster.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Planning a study of hub models that are not downloaded here: with the hub off, the DAG build rejects hub ids
# missing from the local cache (tunelens.preflight), so dry runs of such configs say the hub is on. Nothing is
# downloaded: no job runs.
HUB_ON_ENV = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}


# ----------------------------------------------------------------------------------------- dry runs
@dataclass(frozen=True)
class PlannedJob:
    """One job of a dry run: its rule, wildcards and output paths (relative to the workdir)."""

    rule: str
    wildcards: tuple[tuple[str, str], ...]
    outputs: tuple[str, ...]
    reason: str = field(default="", compare=False)
    local: bool = field(default=False, compare=False)  # a localrule: runs in the Snakemake process

    @property
    def key(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        return (self.rule, self.wildcards)


# A group job's members (profiles/slurm groups each model's and variant's jobs) are listed indented by 4 more.
_JOB_HEADER = re.compile(r"^(?: {4})?(local)?rule (\S+):$")
_JOB_FIELD = re.compile(r"^ {4}(?: {4})?(\w+): (.*)$")


def parse_dry_run(text: str) -> list[PlannedJob]:
    """The jobs listed by `snakemake --dry-run` (one `rule NAME:` block per job)."""
    jobs = []
    current: dict | None = None

    def close():
        if current is not None:
            jobs.append(
                PlannedJob(
                    rule=current["rule"],
                    wildcards=tuple(sorted(current["wildcards"].items())),
                    outputs=tuple(current["outputs"]),
                    reason=current["reason"],
                    local=current["local"],
                )
            )

    for line in text.splitlines():
        header = _JOB_HEADER.match(line)
        if header:
            close()
            current = {"rule": header.group(2), "wildcards": {}, "outputs": [], "reason": "", "local": bool(header.group(1))}
            continue
        if current is None:
            continue
        match = _JOB_FIELD.match(line)
        if not match:
            if line and not line.startswith(" "):
                close()
                current = None
            continue
        key, value = match.groups()
        if key == "output":
            current["outputs"] = [path.strip() for path in value.split(",")]
        elif key == "wildcards":
            current["wildcards"] = dict(item.strip().split("=", 1) for item in value.split(","))
        elif key == "reason":
            current["reason"] = value
    close()
    return jobs


def snakemake(workdir: Path, configfile: Path, *args: str, check: bool = True, env: dict | None = None,
              snakefile: Path = REPO / "Snakefile"):
    """Run snakemake on the repository's Snakefile (or `snakefile`) in `workdir`; returns (CompletedProcess, seconds)."""
    command = [
        SNAKEMAKE,
        "--snakefile", str(snakefile),
        "--directory", str(workdir),
        "--configfile", str(configfile),
        *args,
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE_ENV, **(env or {})},
        cwd=REPO,
    )
    seconds = time.perf_counter() - started
    if check and result.returncode != 0:
        raise RuntimeError(
            f"snakemake {' '.join(args)} exited {result.returncode} in {workdir}:\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-4000:]}"
        )
    return result, seconds


def dry_run(workdir: Path, configfile: Path, *args: str, snakefile: Path = REPO / "Snakefile",
            env: dict | None = None) -> tuple[list[PlannedJob], float]:
    """The jobs Snakemake would run (with `args`, e.g. targets or --forcerun), and the wall time."""
    result, seconds = snakemake(workdir, configfile, "--dry-run", *args, snakefile=snakefile, env=env)
    return parse_dry_run(result.stdout + result.stderr), seconds


def _looks_like_directory(path: str) -> bool:
    # directory() outputs of this workflow (results/models/<m>, finetune/<m>/adapter) have no suffix;
    # every file output does.
    return "." not in Path(path).name


def fake_finished_study(workdir: Path, configfile: Path, *args: str, snakefile: Path = REPO / "Snakefile",
                        env: dict | None = None) -> list[PlannedJob]:
    """Make `workdir` look like a finished run: every output exists and has Snakemake metadata.

    Creates each planned output (empty file, or a directory with a marker file), then lets
    `snakemake --touch --forceall` give them DAG-ordered mtimes and record params/code metadata.
    Returns the jobs that were faked.
    """
    jobs, _ = dry_run(workdir, configfile, *args, snakefile=snakefile, env=env)
    for job in jobs:
        for output in job.outputs:
            path = workdir / output
            if _looks_like_directory(output):
                path.mkdir(parents=True, exist_ok=True)
                (path / "fake").write_text("faked by bench_dag.fake_finished_study\n")
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("")
    snakemake(workdir, configfile, "--touch", "--forceall", "--cores", "1", "--quiet", "all", *args,
              snakefile=snakefile, env=env)
    return jobs


# ----------------------------------------------------------------------------------------- configs
def sweep_config(n_models: int, n_configs: int) -> dict:
    """A config with `n_models` hub models (32 layers, nothing loaded) and `n_configs` decoding configs."""
    models = {
        f"model{index:02d}": {"source": f"example-org/model-{index:02d}", "num_layers": 32}
        for index in range(n_models)
    }
    configs = [
        {"top_k": 10 + index % 90, "num_beams": 1, "temperature": round(0.05 * (1 + index // 90), 2)}
        for index in range(n_configs)
    ]
    return {
        "seed": 1234,
        "device": "cuda",
        "dataset": {"name": "alpaca", "source": "tatsu-lab/alpaca", "test_size": 500},
        "models": models,
        "decoding": {"mode": "list", "configs": configs},
        "scoring": {"judge": {"enabled": True, "model": "example-org/judge"}},
        "probe": {"layers": [8, 16, 24, 32]},
    }


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------- benchmarks
def bench_sweep(n_models: int, n_configs: int, repeat: int, profile_top: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="tunelens-bench-sweep-") as tmp:
        tmp = Path(tmp)
        configfile = _write_yaml(tmp / "sweep.yaml", sweep_config(n_models, n_configs))
        workdir = tmp / "work"
        workdir.mkdir()
        times = []
        n_jobs = 0
        for _ in range(repeat):
            jobs, seconds = dry_run(workdir, configfile, env=HUB_ON_ENV)
            n_jobs = len(jobs)
            times.append(seconds)
        _, quiet_seconds = snakemake(workdir, configfile, "--dry-run", "--quiet", "all", env=HUB_ON_ENV)
        result = {"models": n_models, "configs": n_configs, "jobs": n_jobs, "dry_run_s": times,
                  "dry_run_quiet_s": quiet_seconds}  # fmt: skip
        if profile_top:
            result["profile"] = _profile(workdir, configfile, profile_top)
        return result


def bench_noop(configfile: Path, repeat: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="tunelens-bench-noop-") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        jobs = fake_finished_study(workdir, configfile, env=HUB_ON_ENV)
        fake_seconds = time.perf_counter() - started
        dry_times, run_times = [], []
        for _ in range(repeat):
            planned, seconds = dry_run(workdir, configfile, env=HUB_ON_ENV)
            if planned:
                raise RuntimeError(f"no-op dry run planned {len(planned)} jobs, e.g. {planned[0]}")
            dry_times.append(seconds)
            result, seconds = snakemake(workdir, configfile, "--cores", "1", env=HUB_ON_ENV)
            if "Nothing to be done" not in result.stdout + result.stderr:
                raise RuntimeError(f"no-op run did something:\n{result.stderr[-3000:]}")
            run_times.append(seconds)
        return {"config": str(configfile.relative_to(REPO)), "jobs": len(jobs), "fake_s": fake_seconds,
                "dry_run_s": dry_times, "run_s": run_times}  # fmt: skip


def bench_load_config(n_models: int, n_configs: int, repeat: int) -> list[float]:
    """Seconds of tunelens.config.load_config (schema validation, defaults, decoding expansion) per call; the
    first call includes parsing the schema, which is cached for the process."""
    from tunelens.config import load_config

    config = sweep_config(n_models, n_configs)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        load_config(config)
        times.append(time.perf_counter() - start)
    return times


def bench_startup(repeat: int) -> dict:
    """Floor: `snakemake --version` (interpreter + snakemake import) on this machine."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run([SNAKEMAKE, "--version"], capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return {"snakemake_version_s": times}


def _profile(workdir: Path, configfile: Path, top: int) -> str:
    """cProfile of one dry run, in-process, top functions by cumulative time."""
    out = workdir.parent / "dry_run.prof"
    command = [
        sys.executable, "-m", "cProfile", "-o", str(out), SNAKEMAKE,
        "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--configfile", str(configfile), "--dry-run", "--quiet", "all",
    ]  # fmt: skip
    subprocess.run(command, capture_output=True, check=True, cwd=REPO, env={**os.environ, **OFFLINE_ENV, **HUB_ON_ENV})
    import io
    import pstats

    stream = io.StringIO()
    pstats.Stats(str(out), stream=stream).sort_stats("cumulative").print_stats(top)
    return stream.getvalue()


def _fmt(times: list[float]) -> str:
    return f"{min(times):.1f} s (min of {len(times)}; all: {', '.join(f'{t:.1f}' for t in times)})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--configs", type=int, default=160, help="decoding configs in the sweep (160 -> ~9,800 jobs)")
    parser.add_argument("--noop-config", type=Path, default=REPO / "configs" / "alpaca-7b.yaml")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--only", choices=["sweep", "noop", "load_config"])
    parser.add_argument("--profile-top", type=int, default=0, help="also cProfile one sweep dry run")
    args = parser.parse_args(argv)

    print(f"# bench_dag on {platform.node()} ({os.cpu_count()} CPUs), python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    startup = bench_startup(args.repeat)
    print(f"snakemake --version: {_fmt(startup['snakemake_version_s'])}")
    if args.only in (None, "sweep"):
        sweep = bench_sweep(args.models, args.configs, args.repeat, args.profile_top)
        print(f"sweep {sweep['models']} models x {sweep['configs']} configs: {sweep['jobs']} jobs planned")
        print(f"  dry run (jobs printed): {_fmt(sweep['dry_run_s'])}")
        print(f"  dry run --quiet all:    {sweep['dry_run_quiet_s']:.1f} s")
        if "profile" in sweep:
            print(sweep["profile"])
    if args.only in (None, "load_config"):
        times = bench_load_config(args.models, args.configs, args.repeat)
        print(f"tunelens.config.load_config of the {args.models} x {args.configs} sweep config: first call "
              f"{times[0]:.3f} s (schema parsed), then {min(times[1:] or times):.3f} s (min of the rest)")
    if args.only in (None, "noop"):
        noop = bench_noop(args.noop_config.resolve(), args.repeat)
        print(f"no-op rerun of {noop['config']} ({noop['jobs']} jobs, faked in {noop['fake_s']:.1f} s)")
        print(f"  dry run:            {_fmt(noop['dry_run_s'])}")
        print(f"  snakemake --cores 1: {_fmt(noop['run_s'])}")
    print(f"# load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
