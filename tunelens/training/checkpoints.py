"""Fine-tune checkpoints: the run fingerprint that decides whether a checkpoint directory may be resumed, and
picking the last complete checkpoint of the same run (tunelens.training.finetune resumes from it)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from tunelens.io import sha256_file, write_json_atomic
from tunelens.settings.finetune import FinetuneSection
from tunelens.training.plan import TrainingPlan

log = logging.getLogger(__name__)

# Written into the checkpoint directory: checkpoints are resumed only by a run with the same fingerprint.
RUN_FINGERPRINT_FILE = "tunelens_run.json"


def run_fingerprint(model_path: str, train_jsonl: str | Path, settings: FinetuneSection | dict, prompt_format: str,
                    seed: int, plan: TrainingPlan, revision: str | None = None, processes: int = 1) -> dict:
    """What must match for a checkpoint to be resumed: inputs, settings, seed, the resolved plan and the number
    of data-parallel processes (each process's settings differ with it)."""
    model_dir = Path(model_path)
    model_id = {"path": str(model_path), "revision": revision}
    if (model_dir / "config.json").exists():
        model_id["config_sha256"] = sha256_file(model_dir / "config.json")
        weights = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
        # Sizes and names, not contents: hashing 14 GB of weights on every rerun would cost minutes.
        model_id["weights"] = [[p.name, p.stat().st_size] for p in weights]
    return {
        "model": model_id,
        "train_sha256": sha256_file(train_jsonl),
        "settings": FinetuneSection.from_dict(settings).as_dict(),
        "prompt_format": prompt_format,
        "seed": seed,
        "plan": {"method": plan.method, "device": plan.device, "compute_dtype": plan.compute_dtype,
                 "gradient_checkpointing": plan.gradient_checkpointing, "liger": plan.liger},
        # Only when > 1: one-process fingerprints (and their checkpoints) stay as they were.
        **({"data_parallel_processes": processes} if processes > 1 else {}),
    }


def _complete_checkpoint(path: Path) -> bool:
    # The trainer writes trainer_state.json after the weights and optimizer, so a checkpoint dir killed
    # mid-write lacks it (or its optimizer) and must not be resumed.
    return (path / "trainer_state.json").exists() and (path / "optimizer.pt").exists() and (
        (path / "adapter_model.safetensors").exists() or (path / "adapter_model.bin").exists()
    )


def prepare_checkpoint_dir(checkpoint_dir: str | Path, fingerprint: dict) -> Path | None:
    """Create `checkpoint_dir` for this run and return the checkpoint to resume from, or None.

    Checkpoints written by a run with another fingerprint are deleted (logged): resuming them would mix
    two different trainings.
    """
    checkpoint_dir = Path(checkpoint_dir)
    record = checkpoint_dir / RUN_FINGERPRINT_FILE
    if checkpoint_dir.exists():
        previous = None
        if record.exists():
            try:
                previous = json.loads(record.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                previous = None
        # Compare through JSON so tuples/lists and int/float spellings of the same value agree.
        if previous != json.loads(json.dumps(fingerprint)):
            log.warning("%s: checkpoints of a different run (data, settings, seed or model changed); deleting them",
                        checkpoint_dir)
            shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if not record.exists():
        write_json_atomic(record, fingerprint)
    candidates = sorted(
        (p for p in checkpoint_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for candidate in candidates:
        if _complete_checkpoint(candidate):
            return candidate
        log.warning("%s: incomplete checkpoint (killed while saving?), skipped", candidate)
    return None
