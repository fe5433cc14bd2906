"""Per-rule breakdown of a run from its benchmark files (benchmarks/<rule>/<wildcards>.tsv).

    python bench/bench_rules.py [WORKDIR]          # default: the current directory

Prints a Markdown table: rule, jobs, wall s (total, mean), CPU s (total), peak max_rss MB, in descending
total wall time; then the totals. The numbers are the files' own (tunelens.cost), so this is the same
source as the report's compute-cost section.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tunelens.cost import job_costs, summarise_costs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", nargs="?", type=Path, default=Path("."), help="a run's directory (holds benchmarks/)")
    workdir = parser.parse_args().workdir
    records = job_costs(workdir / "benchmarks", exclude=())
    if not records:
        raise SystemExit(f"no benchmark files under {workdir / 'benchmarks'}")
    totals = summarise_costs(records, "rule")
    everything = totals.pop("all")
    print("| rule | jobs | wall total s | wall mean s | CPU total s | peak max_rss MB |\n|---|---|---|---|---|---|")
    for rule, t in sorted(totals.items(), key=lambda item: -item[1]["wall_s"]):
        cpu = "–" if t["cpu_time_s"] is None else f"{t['cpu_time_s']:.0f}"
        rss = "–" if t["max_rss_mb"] is None else f"{t['max_rss_mb']:.0f}"
        print(f"| {rule} | {t['jobs']} | {t['wall_s']:.0f} | {t['wall_s'] / t['jobs']:.1f} | {cpu} | {rss} |")
    cpu = "–" if everything["cpu_time_s"] is None else f"{everything['cpu_time_s']:.0f}"
    print(f"| **all** | {everything['jobs']} | {everything['wall_s']:.0f} | "
          f"{everything['wall_s'] / everything['jobs']:.1f} | {cpu} | {everything['max_rss_mb'] or 0:.0f} |")


if __name__ == "__main__":
    main()
