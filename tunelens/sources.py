"""Where models and datasets come from: the source-string kinds and the embedded datasets.

Its own small module so that tunelens.config (validation) and tunelens.data.data (reading) both import it and
not each other: every job re-validates the config, and a job's code hash follows imports, so a data.py edit
must not reach config.
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED_PREFIX = "embedded:"
DATA_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet")
EMBEDDED_DATASETS = {
    "demo": "tunelens.data.demo_data.generate_demo_rows: 400 generated instruction rows",
    "demo-holdout": "tunelens.data.demo_data.generate_holdout_rows: 12 rows of task families absent from demo",
}


def source_kind(source: str) -> str:
    """'embedded', 'local' or 'hub' for a model or dataset source string."""
    if source.startswith(EMBEDDED_PREFIX):
        return "embedded"
    looks_like_path = (
        source.startswith(("/", "./", "../", "~"))
        or source.endswith(DATA_EXTENSIONS)
        or Path(source).expanduser().exists()
    )
    if looks_like_path:
        return "local"
    return "hub"
