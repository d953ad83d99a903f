"""eval/ablation_table.py: one row per finished arm, read from the arm folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_arm(root: Path, name: str, recovery: float, evaluation: str = "eval",
             label: str = "validation documents", steps: int = 150) -> None:
    arm = root / name
    (arm / "train" / ".hydra").mkdir(parents=True, exist_ok=True)
    (arm / "train" / ".hydra" / "config.yaml").write_text(f"trainer:\n  max_steps: {steps}\n")
    (arm / "arm.json").write_text(json.dumps({"name": name, "overrides": f"x={recovery}",
                                              "train_seconds": 3 * steps, "eval_seconds": 1}))
    block = {"recovery_l1": recovery, "content_recovery_l1": 0.3,
             "gain_gist_vs_sink_l1": 0.01,
             "ci95": {"recovery_l1": [recovery - 0.05, recovery + 0.05]}}
    (arm / evaluation).mkdir(exist_ok=True)
    (arm / evaluation / "substitutability.json").write_text(json.dumps(
        {"split": {"label": label}, "l1": block}))


def table(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "eval" / "ablation_table.py"), str(root),
                           *args], capture_output=True, text=True)


def test_rows_per_finished_arm_sorted_with_intervals(tmp_path):
    make_arm(tmp_path, "a-low", 0.05)
    make_arm(tmp_path, "b-high", 0.20, steps=300)
    (tmp_path / "c-unfinished" / "train").mkdir(parents=True)  # no arm.json: skipped
    out = table(tmp_path, "--sort", "recovery_l1")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| a-") or
            line.startswith("| b-")]
    assert rows == ["| b-high | 300 | 3.00 | +0.200 [+0.150, +0.250] | +0.300 | +0.010 |",
                    "| a-low | 150 | 3.00 | +0.050 [+0.000, +0.100] | +0.300 | +0.010 |"]
    assert "c-unfinished" not in out.stdout
    assert "Scored on: validation documents." in out.stdout


def test_another_evaluation_folder_is_read_with_eval(tmp_path):
    make_arm(tmp_path, "a", 0.05)
    make_arm(tmp_path, "a", 0.12, evaluation="eval_test", label="test documents")
    out = table(tmp_path, "--eval", "eval_test")
    assert out.returncode == 0, out.stderr
    assert "+0.120 [+0.070, +0.170]" in out.stdout and "test documents" in out.stdout
    missing = table(tmp_path, "--eval", "eval_foreign")
    assert missing.returncode != 0 and "eval_foreign/substitutability.json" in missing.stderr
