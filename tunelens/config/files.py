"""The files a config names and reads: its data sources (dataset.source, the evaluation sets), the config file
itself (duplicate keys, config.yaml with the command line's overrides) and the environment every job inherits."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from tunelens.config.models import HUB_ID
from tunelens.errors import ConfigError
from tunelens.settings import ConfigSection
from tunelens.sources import DATA_EXTENSIONS, EMBEDDED_DATASETS, EMBEDDED_PREFIX, source_kind


# --------------------------------------------------------------------------------------------- data sources
@dataclass(frozen=True)
class EvaluationSet:
    """An entry of `evaluation_sets`: a held-out set evaluated whole (results/eval/<name>/)."""

    name: str
    source: str
    source_kind: str  # embedded | local | hub
    fields: dict
    kind: str  # text | code
    code_language: str
    max_rows: int | None
    hub_split: str

    def prepare_params(self) -> dict:
        """What the `evalset` rule's output depends on besides the training split (its params)."""
        return {"source": self.source, "fields": dict(self.fields), "max_rows": self.max_rows, "hub_split": self.hub_split}


def _check_data_source(source: str, where: str, base_dir: Path) -> str:
    """The kind of a dataset source (embedded/local/hub); an unknown embedded name, a missing or
    unsupported file, or a malformed hub id fails naming `where` (a config key)."""
    kind = source_kind(source)
    if kind == "embedded":
        key = source[len(EMBEDDED_PREFIX):]
        if key not in EMBEDDED_DATASETS:
            raise ConfigError(f"{where}: unknown embedded dataset '{key}'; choices: {sorted(EMBEDDED_DATASETS)}")
    elif kind == "local":
        path = Path(source).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if path.is_dir():
            raise ConfigError(f"{where}: '{source}' is a directory; expected a .json/.jsonl/.csv/.parquet file")
        if not path.is_file():
            raise ConfigError(f"{where}: '{source}': file does not exist ({path.resolve()})")
        if path.suffix not in DATA_EXTENSIONS:
            raise ConfigError(f"{where}: '{source}' has suffix '{path.suffix}'; expected one of {DATA_EXTENSIONS}")
    elif not HUB_ID.match(source):
        raise ConfigError(f"{where}: '{source}' is neither embedded:NAME, an existing file nor a hub id")
    return kind


def _evaluation_sets(config: ConfigSection, base_dir: Path) -> dict[str, EvaluationSet]:
    """`evaluation_sets` by name, in config order. A duplicate name, or the training dataset's own name
    (its test split is the default set), fails naming the entry."""
    sets: dict[str, EvaluationSet] = {}
    dataset_name = config.dataset.name
    for index, entry in enumerate(config.evaluation_sets):
        where = f"evaluation_sets[{index}]"
        name = entry.name
        if name == dataset_name:
            raise ConfigError(
                f"{where}.name: '{name}' is dataset.name (its test split is already the default evaluation set); "
                "give the set another name"
            )
        if name in sets:
            first = [e.name for e in config.evaluation_sets].index(name)
            raise ConfigError(f"{where}.name: duplicate evaluation set name '{name}' (also evaluation_sets[{first}])")
        kind = _check_data_source(entry.source, f"{where}.source", base_dir)
        sets[name] = EvaluationSet(
            name=name,
            source=entry.source,
            source_kind=kind,
            fields=entry.fields.as_dict(),
            kind=entry.kind,
            code_language=entry.code_language,
            max_rows=entry.max_rows,
            hub_split=entry.hub_split,
        )
    return sets


def check_yaml_duplicates(path: str | Path) -> None:
    """Reject a YAML file with a key given twice in one mapping (YAML loaders keep the last one silently)."""
    path = Path(path)

    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        pass

    def construct_mapping(loader, node, deep=False):
        loader.flatten_mapping(node)
        seen: dict = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"{path}, line {key_node.start_mark.line + 1}: duplicate key '{key}' (first at line {seen[key]}); "
                    "YAML would silently keep only the last one"
                )
            seen[key] = key_node.start_mark.line + 1
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from None
    try:
        yaml.load(text, Loader=Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_default_config(workflow_dir: str | Path, overrides: dict | None = None) -> dict:
    """config.yaml next to the Snakefile, deep-updated with `overrides` (the command line's --config)."""
    from snakemake.common.configfile import load_configfile
    from snakemake.utils import update_config

    config = load_configfile(str(Path(workflow_dir) / "config.yaml"))
    update_config(config, copy.deepcopy(overrides or {}))
    return config


# --------------------------------------------------------------------------------------------- jobs
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def prepare_job_environment(workflow_dir: str) -> None:
    """Environment every job inherits (local, conda or SLURM: Snakemake re-imports common.smk in each).

    Jobs import tunelens from the workflow's checkout whichever Python runs them, and run offline unless
    the user exported HF_HUB_OFFLINE=0 (and friends) to allow hub downloads.
    """
    paths = [workflow_dir, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    for variable in OFFLINE_VARIABLES:
        os.environ.setdefault(variable, "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
