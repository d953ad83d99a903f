"""eval/lane_ablation_table.py: per arm the paired B − A rows of its compare.json (bold where
the interval excludes 0, n/a where absent), its own long-range gains, and its wall time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def row(stat: str, diff: float, verdict: str = "tie") -> dict:
    return {"statistic": stat, "better": "higher", "a": 0.5, "b": 0.5 + diff, "diff": diff,
            "ci95": [diff - 0.01, diff + 0.01], "verdict": verdict}


def own(gain: float) -> dict:
    blocks = []
    for n in (16384, 32768):
        b = {"context_tokens": n, "ci95": {}}
        for w in (1024, 2048):
            key = f"gain_mixed@{w}_vs_streaming@{w}"
            b[key] = gain + n / 1e6 + w / 1e5
            b["ci95"][key] = [b[key] - 0.02, b[key] + 0.02]
        blocks.append(b)
    return {"compressor_digest": f"digest-{gain}", "long_range": {"by_length": blocks}}


def arm(root: Path, name: str, shift: float, with_l2: bool = True) -> Path:
    d = root / name
    d.mkdir()
    report = {"b": {"digest": f"digest-{name}"},
              "levels": {"l1": {"rows": [row("recovery_l1", shift, "better"),
                                         row("content_recovery_l1", 2 * shift)],
                                "mixed": [{"budget": w, "rows": [row("gain_vs_streaming",
                                                                     shift + w / 1e4)]}
                                          for w in (128, 256)]},
                         "l2": {"rows": [row("recovery_l2", -shift, "worse")] if with_l2
                                else []}},
              "long_range": [{"context_tokens": n, "rows": [row("nll_mixed@2048", -shift / n),
                                                            row("nll_gist_l2", shift)]}
                             for n in (16384, 32768)]}
    (d / "compare.json").write_text(json.dumps(report))
    (d / "substitutability.json").write_text(json.dumps(own(shift)))
    return d


def test_table_json_and_plot_of_two_arms(tmp_path):
    ref = tmp_path / "A"
    ref.mkdir()
    (ref / "substitutability.json").write_text(json.dumps(own(0.0)))
    off, rank4 = arm(tmp_path, "off", 0.05), arm(tmp_path, "rank4", -0.02, with_l2=False)
    (tmp_path / "times.txt").write_text("off 120 s\nrank4 95 s\nnot a time line\n")
    out = tmp_path / "lane-ablation"
    done = subprocess.run([sys.executable, str(ROOT / "eval" / "lane_ablation_table.py"),
                           f"off={off}", f"rank4={rank4}", "--reference", f"rank8={ref}",
                           "--times", str(tmp_path / "times.txt"), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    r = json.loads(out.with_suffix(".json").read_text())
    assert r["reference"]["name"] == "rank8" and r["reference"]["digest"] == "digest-0.0"
    assert [a["name"] for a in r["arms"]] == ["off", "rank4"]
    a_off, a_r4 = r["arms"]
    assert a_off["digest"] == "digest-off" and a_off["train_seconds"] == 120
    assert a_off["paired"]["recovery_l1"]["diff"] == 0.05
    assert a_off["paired"]["L1 mixed@256 gain vs streaming"]["diff"] == 0.05 + 256 / 1e4
    assert a_off["paired"]["32k mixed@2048 NLL"]["diff"] == -0.05 / 32768
    assert "recovery_l2" not in a_r4["paired"] and a_r4["train_seconds"] == 95
    assert a_off["own_gain_vs_streaming"]["32768@1024"] == [
        0.05 + 32768 / 1e6 + 1024 / 1e5, 0.05 + 32768 / 1e6 + 1024 / 1e5 - 0.02,
        0.05 + 32768 / 1e6 + 1024 / 1e5 + 0.02]
    md = out.with_suffix(".md").read_text()
    assert md.strip() in done.stdout
    lines = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines()}
    assert lines["recovery_l1"] == "| recovery_l1 | **+0.05 [+0.04, +0.06]** | " \
                                   "**-0.02 [-0.03, -0.01]** |"
    assert lines["content_recovery_l1"].endswith("| +0.10 [+0.09, +0.11] | "
                                                 "-0.04 [-0.05, -0.03] |")  # ties: not bold
    assert lines["recovery_l2"].endswith("| **-0.05 [-0.06, -0.04]** | n/a |")
    assert lines["training wall (s)"] == "| training wall (s) | 120 | 95 |"
    assert out.with_suffix(".png").stat().st_size > 0
