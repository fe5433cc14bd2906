"""Job start-up cost: CPU seconds a fresh interpreter spends importing what each rule's script imports.

    python bench/bench_startup.py [--repeats 3]

Every Snakemake job is a new Python process; this measures the part of a job that is not its work. CPU time
(user + sys of the child, resource.RUSAGE_CHILDREN) is reported beside wall time because on a shared machine
wall time mostly measures the other processes. Prints one Markdown table row per import set, plus the load
average at start and end.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What each job's script imports before it starts its own work (scripts/<rule>.py, top level).
IMPORT_SETS = {
    "python (bare interpreter)": "pass",
    "split": "import tunelens.data.data",
    "score (no BERTScore)": "import tunelens.scoring.score",
    "score + BERTScore scorer import": "import tunelens.scoring.score, bert_score",
    "report": "import tunelens.report",
    "model job: torch": "import torch",
    "model job: generate": "import torch, tunelens.generation.generate, transformers; from transformers import AutoModelForCausalLM",
    "model job: finetune": "import torch, tunelens.training.finetune, datasets, peft, trl",
}


def measure(code: str) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    print("| imports | CPU s (min of runs) | wall s (min of runs) |\n|---|---|---|")
    for name, code in IMPORT_SETS.items():
        runs = [measure(code) for _ in range(args.repeats)]
        print(f"| {name} | {min(c for _, c in runs):.2f} | {min(w for w, _ in runs):.2f} |", flush=True)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
