"""bench/gpu_check.py, the prepared GPU run, rehearsed on the CPU at tiny widths (so that it cannot rot before a GPU
is lent): every part runs and is recorded ok with its figures; a planted failure is recorded and the next part runs."""
import json
import os
import subprocess
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402


def rehearse(out, *extra, env=None):
    cmd = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def test_cpu_rehearsal_runs_every_part(tmp_path):
    r = rehearse(tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == gpu_check.PARTS
    for name, entry in parts.items():
        assert entry["ok"] is True and "error" not in entry, (name, entry)
        assert entry["seconds"] >= 0
        assert f"[{name}] ok" in r.stdout  # one line per part as it finishes
    assert report["device"].startswith("cpu") and report["tiny"] is True
    assert parts["env"]["torch"] and parts["env"]["missing packages"] == []
    # OASIS: the three precisions' steps ran (fp16 is CUDA-only and says so), the resumed run equals the
    # uninterrupted one exactly on the CPU, torchrun ran on gloo
    oasis = parts["oasis"]
    assert "torchrun bf16 last losses G, D" in oasis and "fp32 last losses G, D" in oasis and "CUDA-only" in oasis["fp16"]
    assert oasis["resume max |loss gap|"] == 0.0 and oasis["torchrun backend"] == "gloo"
    piti = parts["piti"]
    assert "bf16 last loss" in piti and piti["torchrun backend"] == "gloo" and "math fallback disabled" in piti["fused SDPA"]
    assert (tmp_path / "piti" / "bf16" / "samples").is_dir()
    ev = parts["evaluate"]
    assert ev["ade20k upernet101"]["fid"] > 0 and "kid" in ev["ade20k upernet101"]  # 0: features that never vary
    for key in ("ade20k upernet101", "coco deeplabv2", "cityscapes drn105"):
        assert 0 <= ev[key]["miou"] <= 1 and 0 <= ev[key]["miou_real"] <= 1
    assert parts["bench_oasis"]["batch 1"]["img/s"] > 0
    assert parts["bench_piti"]["batch 1"]["end-to-end img/s"] > 0
    fid = parts["bench_fid"]
    assert fid["ours bf16"]["img/s"] > 0 and fid["max relative feature difference"] < 1e-4  # CPU fp32: identical
    md = (tmp_path / "gpu_check.md").read_text()
    assert report["commit"] in md and "| evaluate | yes |" in md and "tiny widths" in md


def test_planted_failure_is_recorded_and_the_next_part_runs(tmp_path):
    r = rehearse(tmp_path, "--parts", "env,bench_piti", env={gpu_check.FAIL_ENV: "env"})
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert list(parts) == ["env", "bench_piti"]
    env = parts["env"]
    assert env["ok"] is False and env["error"].startswith("env: CheckFailed: env: planted failure")
    assert "Traceback" in env["traceback"] and "CheckFailed" in env["traceback"]
    assert parts["bench_piti"]["ok"] is True and parts["bench_piti"]["batch 1"]["end-to-end img/s"] > 0
    assert "[env] FAILED" in r.stdout and "failed: env" in r.stdout
    assert "| env | **no** |" in (tmp_path / "gpu_check.md").read_text()


def test_unknown_part_is_refused_in_one_line(tmp_path):
    r = rehearse(tmp_path, "--parts", "env,nope")
    assert r.returncode == 2 and "--parts: unknown nope" in r.stderr
