"""The newcomer's two timings: `make run` and `.ci/run` on a fresh clone, install included (issue 13).

    python bench/bench_fresh_clone.py run [--repeats 2] [--keep]     # git clone + `time make run`
    python bench/bench_fresh_clone.py ci  [--repeats 2] [--keep]     # git clone + `time .ci/run`

Each repeat clones the current commit of this checkout into a new temporary directory (nothing is shared with
the checkout: no venv, no results) and, unless --warm-cache, gives pip and uv empty cache directories, so every
package is fetched again as on a new CI machine (this machine's local mirror and torch wheel stay, as the CI
machine has them too). It runs the target
there and prints one Markdown row: wall seconds, CPU seconds of the target's process tree and of the whole machine
(/proc/stat: SLURM jobs and detached servers are not in the tree, and anything else running shows here), the phases the target prints (install / SLURM / suite), the
1-minute load average before and after (anything else running shows there), and the commit. For `run` it also
prints the per-rule table of that run (bench/bench_rules.py on its benchmark files) and the fine-tuned vs base
BLEU at the default decoding config from its summary.md. The clone is deleted afterwards unless --keep.
Measure on an idle machine: the target's own jobs are the only load that belongs in the figure.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMANDS = {"run": ["make", "run"], "ci": [".ci/run"]}


def load_average() -> float:
    return os.getloadavg()[0]


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has spent busy (/proc/stat), SLURM jobs and servers included."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def bleu_lines(summary: Path) -> list[str]:
    """The paired fine-tuned-vs-base BLEU rows of summary.md (section 'Fine-tuning effect')."""
    if not summary.exists():
        return []
    return [line for line in summary.read_text().splitlines() if re.match(r"\| \w+ +\| BLEU ", line)]


def cost_total(summary: Path) -> str:
    """The 'all' row of summary.md's Compute cost section (to set beside bench_rules.py's own total)."""
    if not summary.exists() or "## Compute cost" not in summary.read_text():
        return "summary.md has no Compute cost section"
    section = summary.read_text().split("## Compute cost", 1)[1]
    return next((f"summary.md Compute cost: {line}" for line in section.splitlines() if "**all**" in line), "–")


def one(target: str, keep: bool, warm_cache: bool) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    clone = Path(tempfile.mkdtemp(prefix=f"tunelens-{target}-"))
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    log = clone.parent / f"{clone.name}.log"
    env = dict(os.environ)
    if not warm_cache:
        caches = clone.parent / f"{clone.name}-caches"
        env.update(PIP_CACHE_DIR=str(caches / "pip"), UV_CACHE_DIR=str(caches / "uv"))
    load_before = load_average()
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before = machine_busy_seconds()
    started = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(COMMANDS[target], cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    busy = machine_busy_seconds() - busy_before
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU of the waited-for process tree: not SLURM's jobs (slurmd's children) nor detached servers.
    cpu = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
    load_after = load_average()
    text = log.read_text()
    phases = {name: float(m.group(1)) for name, pattern in
              [("installs", r"done after (\d+) s"), ("SLURM up", r"SLURM up after (\d+) s"),
               ("suite", r" in ([\d.]+)s \(")] if (m := re.search(pattern, text))}  # fmt: skip
    tests = re.search(r"=+ (\d+ passed[^=]*) in ", text)
    print(f"| {target} | {commit} | {'ok' if result.returncode == 0 else f'FAILED ({result.returncode})'} | "
          f"{wall:.0f} s ({wall / 60:.1f} min) | {cpu:.0f} | {busy:.0f} | {', '.join(f'{k} {v:.0f} s' for k, v in phases.items()) or '–'} | "
          f"{tests.group(1) if tests else '–'} | {load_before:.2f} -> {load_after:.2f} |", flush=True)
    if target == "run":
        subprocess.run([sys.executable, str(REPO / "bench" / "bench_rules.py"), str(clone)])
        print(cost_total(clone / "results" / "summary.md"))
        print("\n".join(bleu_lines(clone / "results" / "summary.md")))
    if result.returncode != 0:
        print(text[-4000:])
    if keep:
        print(f"kept: {clone} (log {log})")
    else:
        shutil.rmtree(clone, ignore_errors=True)
        log.unlink(missing_ok=True)
    shutil.rmtree(clone.parent / f"{clone.name}-caches", ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=sorted(COMMANDS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep each clone and its log")
    parser.add_argument("--warm-cache", action="store_true", help="use the user's pip/uv caches as they are")
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs")
    print("| target | commit | result | wall | CPU s (process tree) | CPU s (machine) | phases | tests | "
          "load avg (1 min) before -> after |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for _ in range(args.repeats):
        one(args.target, args.keep, args.warm_cache)


if __name__ == "__main__":
    main()
