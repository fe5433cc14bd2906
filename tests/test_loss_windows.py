"""Training loss summarised over windows (issue 22): the divergence check and the report compare the mean
loss of the first and last 10% of logged steps, not two single batches."""

from __future__ import annotations

import numpy as np
import pytest

from tunelens.training.finetune import DivergenceError, check_divergence
from tunelens.report.provenance import loss_summary
from tunelens.training.outputs import loss_windows

# 40 logged steps hovering between 2.2 and 3.4 (as in the study), slowly improving; an easy first batch
# (1.3) and a hard last one (3.3): the single points say "2.5x higher", the windows say "no change".
NOISY = [1.3, 2.9, 3.2, 2.8] + [2.9 - 0.01 * i + (0.4 if i % 3 == 0 else -0.3) for i in range(32)] + [2.3, 2.6,
                                                                                                    2.4, 3.3]
# The reverse: a hard first batch (5.0) and an easy last one (2.0) hide a run whose loss went from ~1.5 to ~5.
HIDDEN = [5.0, 0.3, 0.3, 0.3] + list(np.linspace(0.5, 6.0, 32)) + [6.0, 6.0, 6.0, 2.0]


def log(losses):
    return [{"step": i + 1, "loss": float(loss), "grad_norm": 1.0} for i, loss in enumerate(losses)]


def test_windows_are_the_first_and_last_tenth_of_logged_steps():
    window = loss_windows(log(NOISY))
    assert window["size"] == 4 and window["logged"] == 40
    assert window["first"] == pytest.approx(np.mean(NOISY[:4])) and window["last"] == pytest.approx(np.mean(NOISY[-4:]))
    assert window["first_steps"] == (1, 4) and window["last_steps"] == (37, 40)
    # At least one step: 3 logged steps give one-step windows; 11 give 2 (10% rounded up).
    assert loss_windows(log([3.0, 2.0, 1.0]))["size"] == 1
    assert loss_windows(log([1.0] * 11))["size"] == 2


def test_noisy_single_points_are_not_divergence():
    """Failed before: 'loss rose from 1.3 (step 1) to 3.3 (step 40)'."""
    assert NOISY[-1] > 2 * NOISY[0] and NOISY[-1] - NOISY[0] > 0.5  # what the old check compared
    check_divergence(log(NOISY), {"learning_rate": 2e-4}, "m")


def test_a_rise_hidden_by_single_points_is_divergence():
    """Failed before: the first point (5.0) is above the last (2.0), so nothing was raised."""
    with pytest.raises(DivergenceError) as error:
        check_divergence(log(HIDDEN), {"learning_rate": 2e-4}, "m")
    expected = f"loss rose from {np.mean(HIDDEN[:4]):.4g} (mean of steps 1-4) to {np.mean(HIDDEN[-4:]):.4g} (mean of steps 37-40)"
    assert expected in str(error.value) and "first and last 4 of 40 logged steps" in str(error.value)


def test_non_finite_and_vanished_gradient_checks_remain():
    rows = log(NOISY)
    rows[20]["loss"] = float("nan")
    with pytest.raises(DivergenceError, match="loss is nan at step 21"):
        check_divergence(rows, {}, "m")
    rows = [{**row, "grad_norm": 0.0} for row in log(NOISY)]
    with pytest.raises(DivergenceError, match="gradient norm is 0 from step 2 on"):
        check_divergence(rows, {}, "m")


def test_report_states_the_windowed_loss_and_its_window():
    """Failed before: 'train loss: 1.3000 at step 1 → 3.3000 at step 40 (40 logged steps)'."""
    text = loss_summary(log(NOISY))
    assert f"{np.mean(NOISY[:4]):.4f} (mean of steps 1-4) → {np.mean(NOISY[-4:]):.4f} (mean of steps 37-40)" in text
    assert "the first and last 10% of 40 logged steps, 4 step(s) each" in text
    assert f"single steps range {min(NOISY):.4f}–{max(NOISY):.4f}" in text


def test_canonical_adapter_config_sorts_set_valued_fields_and_keeps_the_rest(tmp_path):
    import json

    from tunelens.training.outputs import canonical_adapter_config

    config = {"r": 8, "target_modules": ["v_proj", "q_proj", "down_proj"], "modules_to_save": None,
              "peft_type": "LORA", "layers_to_transform": [3, 1]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    canonical_adapter_config(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert {k: v for k, v in written.items() if k != "target_modules"} == \
        {k: v for k, v in config.items() if k != "target_modules"}
    # two orders of the same set give the same bytes
    first = (tmp_path / "adapter_config.json").read_bytes()
    config["target_modules"] = ["q_proj", "down_proj", "v_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    canonical_adapter_config(tmp_path)
    assert (tmp_path / "adapter_config.json").read_bytes() == first
