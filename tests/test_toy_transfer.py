"""The README's first command, shortened: the whole toy pipeline (estimate -> finetune -> evaluate) runs."""
import json
import subprocess
import sys

from conftest import REPO


def test_quick_pipeline_writes_grid_and_results(tmp_path):
    out = tmp_path / "quick"
    cmd = [sys.executable, "bench/toy_transfer.py", "--quick", "--out", str(out), "--device", "cpu",
           "--seg-epochs", "1", "--source-steps", "4", "--steps", "4"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads((out / "results.json").read_text())
    assert set(summary) == {"CAT training-free, combination", "CAT finetuned, combination (hard)"}
    ev = out / "seed0" / "eval_cat_finetuned_combination_hard"
    res = json.loads((ev / "results.json").read_text())
    assert res["fid"] >= 0 and 0 <= res["miou"] <= 1
    assert (ev / "grid.png").stat().st_size > 0 and (out / "figure.png").exists()
    assert str(ev / "grid.png") in r.stdout  # the demo says where the grid is
    # the affinity used was estimated from the 100-shot subset, and the finetune run wrote its subset
    assert len((out / "seed0" / "run_cat_finetuned_combination_hard" / "subset.txt").read_text().split()) == 100
