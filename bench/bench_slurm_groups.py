"""The smoke study on the local test SLURM (tests/slurm/start-slurm.sh, up): SLURM jobs, model loads, wall.

    .venv/bin/python bench/bench_slurm_groups.py                          # this checkout, its profile
    .venv/bin/python bench/bench_slurm_groups.py --checkout /tmp/old      # another checkout (e.g. `git archive`)
    .venv/bin/python bench/bench_slurm_groups.py --snakemake-args "--group-components model_{model}_{variant}=1"

The study is tests/test_cluster.py's (configs/smoke.yaml on the suite's 4-layer random Llama, one probe layer),
run with `--profile <checkout>/profiles/slurm-local` and PYTHONPATH=<checkout>. Prints the wall time, the SLURM
jobs by name, the model loads per (model, variant) from the outputs' `execution` records, and the generation
servers started with the requests each served (from their logs).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=REPO, help="the tunelens checkout to run (default: this one)")
    parser.add_argument("--snakemake-args", default="", help="extra snakemake arguments, one shell-quoted string")
    parser.add_argument("--workdir", type=Path, default=None, help="where to run (default: a new temp folder)")
    args = parser.parse_args(argv)

    sys.path[:0] = [str(REPO / "tests"), str(REPO / "bench")]
    from conftest import _build_tiny
    from test_cluster import (SAME_NUMERICS_ENV, SNAKEMAKE, model_loads, server_starts, submitted_slurm_jobs,
                              tiny_smoke_config)
    from transformers import AutoTokenizer

    from tunelens.models import EMBEDDED_MODELS, _module_dir

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_slurm_groups-"))
    entry = EMBEDDED_MODELS["smollm2-135m-instruct"]
    tokenizer_dir = root / "tokenizer"
    AutoTokenizer.from_pretrained(_module_dir(entry), gguf_file=entry["gguf"]).save_pretrained(tokenizer_dir)
    model = _build_tiny(root / "tiny", tokenizer_dir, "llama", 4)
    smoke = tiny_smoke_config(root, model)
    work, code = root / "slurm", args.checkout.resolve()
    started = time.perf_counter()
    result = subprocess.run(
        [SNAKEMAKE, "--snakefile", str(code / "Snakefile"), "--directory", str(work), "--configfile", str(smoke),
         "--profile", str(code / "profiles" / "slurm-local"), *shlex.split(args.snakemake_args)],
        cwd=code, env={**os.environ, **SAME_NUMERICS_ENV, "PYTHONPATH": str(code)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    jobs = submitted_slurm_jobs(result.stdout)
    logs = [path.read_text() for path in (work / ".tunelens").rglob("*.log")]
    served = [line.rsplit("stopped after", 1)[1].split()[0] for text in logs for line in text.splitlines()
              if "stopped after" in line]  # fmt: skip
    print(f"checkout {code}: exit {result.returncode}, wall {seconds:.0f} s, {len(jobs)} SLURM jobs")
    print(f"  jobs: {sorted(jobs.values())}")
    print(f"  model loads in jobs that record them: {model_loads(work)}")
    print(f"  generation servers: {server_starts(work)}, requests each: {served}")
    if result.returncode:
        print(result.stdout[-3000:])
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
