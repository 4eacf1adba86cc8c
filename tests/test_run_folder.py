"""The run folder's rules (models/run.py, issue 31 §1 §2): one writer at a time (an OS lock that dies with its
process), never an input folder, and --overwrite removes only the files a run recorded writing."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import finetune_oasis
from conftest import REPO
from models import DataError, curves, run

TINY = ["--init", "scratch", "--data", "toy-target", "--channels", "4", "--z-dim", "8", "--spade-hidden", "8",
        "--d-channels", "3,8,8,16,16,16,16", "--d-last", "8", "--batch", "2", "--n", "4", "--bn-batches", "2",
        "--grid-n", "2", "--device", "cpu", "--stage1-steps", "0", "--stage2-steps", "0"]


def refused(fn, *words):
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def holder(out):
    """A child process that takes the run folder's lock (as a training run does) and keeps it until killed."""
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from models import run; "
            f"run.lock({str(out)!r}); print('locked', flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_naming_the_pid_and_kill_9_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "finetune_oasis.py", "--out", str(out), *TINY], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and (out / "checkpoint.pt").is_file(), r.stderr[-2000:]
    proc = holder(out)
    try:
        refused(lambda: run.prepare_out(out, True, False, {}), "--out", str(out), f"PID {proc.pid}",
                "writing this run folder")
        # the real script, resuming the run another process writes: refused before it reads anything
        r = subprocess.run([sys.executable, "finetune_oasis.py", "--out", str(out), "--resume"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr and f"PID {proc.pid}" in r.stderr, r.stderr
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert run.prepare_out(out, True, False, {}) == out  # the dead process's lock went with it
    assert (out / run.LOCK).read_text() == str(os.getpid())


def test_resume_with_overwrite_is_refused(tmp_path):
    refused(lambda: finetune_oasis.main(["--out", str(tmp_path / "o"), "--resume", "--overwrite", *TINY]),
            "--resume", "--overwrite", "one of the two")
    assert not (tmp_path / "o").exists()


def test_out_may_not_be_equal_to_inside_or_around_an_input(tmp_path):
    data_root, ckpt_dir = tmp_path / "data", tmp_path / "src"
    (data_root / "images").mkdir(parents=True)
    ckpt_dir.mkdir()
    (ckpt_dir / "checkpoint.pt").write_bytes(b"x")
    inputs = {"--data-root": data_root, "--source-ckpt": ckpt_dir / "checkpoint.pt", "--affinity": "none"}
    for out, how, flag in ((data_root, "is", "--data-root"), (data_root / "images" / "run", "lies inside", "--data-root"),
                           (tmp_path, "contains", "--data-root"), (ckpt_dir, "is the folder of", "--source-ckpt")):
        refused(lambda: run.check_out_vs_inputs(out, inputs), "--out", f"{how} {flag}", "never writes into")
    run.check_out_vs_inputs(tmp_path / "elsewhere", inputs)  # beside the inputs: fine
    run.check_out_vs_inputs(ckpt_dir / "sub", {"--source-ckpt": ckpt_dir / "checkpoint.pt"})  # below a file's folder


def test_finetune_into_its_dataset_is_refused_and_the_dataset_is_intact(tmp_path):
    """finetune_oasis.py --out X --data-root X --overwrite (issue 31 §1): refused before anything is written."""
    ds = tmp_path / "ds"
    for sub in ("images", "labels"):
        (ds / sub).mkdir(parents=True)
    (ds / "classes.txt").write_text("sky\ngrass\n")
    for i in range(4):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(ds / "images" / f"{i}.png")
        Image.fromarray(np.full((64, 64), i % 3, np.uint8)).save(ds / "labels" / f"{i}.png")
    before = sorted((p.relative_to(ds), p.stat().st_size) for p in ds.rglob("*"))
    args = [a if a != "toy-target" else "folder" for a in TINY] + ["--size", "64", "--data-root", str(ds)]
    for out in (ds, ds / "images"):
        refused(lambda: finetune_oasis.main(["--out", str(out), "--overwrite", *args]), "--out", "--data-root")
    assert sorted((p.relative_to(ds), p.stat().st_size) for p in ds.rglob("*")) == before


def test_overwrite_removes_only_what_the_run_recorded(tmp_path):
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    for name in ("checkpoint.pt", "log.jsonl", "samples/000000.png", "notes.txt", "samples/mine.png"):
        (out / name).write_text("x")
    run.record(out, ["checkpoint.pt", "log.jsonl", "samples/000000.png", "best.pt"])  # best.pt: never written
    assert run.recorded_files(out) == ["checkpoint.pt", "log.jsonl", "samples/000000.png"]
    kept = run.remove_recorded(out)
    assert kept == ["notes.txt", "samples/mine.png"] and not (out / run.MANIFEST).exists()
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["notes.txt", "samples", "samples/mine.png"]


def test_a_real_run_records_its_files_and_overwrite_removes_them(tmp_path):
    out = tmp_path / "run"
    finetune_oasis.main(["--out", str(out), *TINY])
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != run.LOCK)
    assert sorted(run.recorded_files(out)) == sorted(w for w in written if w != run.MANIFEST)
    (out / "mine.txt").write_text("the user's")
    finetune_oasis.main(["--out", str(out), "--overwrite", *TINY])
    assert (out / "mine.txt").read_text() == "the user's" and (out / "checkpoint.pt").is_file()


def test_seed_range_is_one_line(tmp_path):
    refused(lambda: finetune_oasis.main(["--out", str(tmp_path / "o"), "--seed", str(2 ** 64), *TINY]),
            "--seed", str(2 ** 64), "< 2**32")
    assert finetune_oasis.get_args(["--out", str(tmp_path / "o"), "--seed", str(2 ** 32 - 1), *TINY])[0].seed == 2 ** 32 - 1


def test_cityscapes_size_and_n_against_subset_file(tmp_path):
    refused(lambda: finetune_oasis.main(["--out", str(tmp_path / "o"), *TINY, "--data", "cityscapes", "--size", "64"]),
            "--size 64", "cityscapes", "256x512")
    assert not (tmp_path / "o").exists()
    first = tmp_path / "first"
    finetune_oasis.main(["--out", str(first), *TINY])
    assert len((first / "subset.txt").read_text().splitlines()) == 4
    refused(lambda: finetune_oasis.main(["--out", str(tmp_path / "o2"), *TINY, "--n", "2",
                                         "--subset-file", str(first / "subset.txt")]),
            "--n 2", "subset.txt", "names 4 images")


def test_a_relative_out_resumes_twice_and_is_overwritten(tmp_path):
    """--out given relative to the working directory: a run resumed twice (its own subset.txt, which the
    checkpoint's flags then name, is no input) and then started over with --overwrite, which removes its files."""
    def script(*args):
        r = subprocess.run([sys.executable, str(REPO / "finetune_oasis.py"), "--out", "rel", *TINY, *args], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    script("--stage2-steps", "1")
    script("--stage2-steps", "2", "--resume")
    script("--stage2-steps", "3", "--resume")
    assert torch.load(tmp_path / "rel" / "checkpoint.pt", map_location="cpu", weights_only=True)["step"] == 3
    script("--overwrite")  # 0 steps: the model as built
    assert torch.load(tmp_path / "rel" / "checkpoint.pt", map_location="cpu", weights_only=True)["step"] == 0
    assert not (tmp_path / "rel" / "samples" / "000003.png").exists()


def test_resume_after_the_classes_were_reordered_or_grown_is_refused(tmp_path):
    """Issue 31 §3: a run resumed on a classes.txt reordered (or grown) since it was saved is refused in one line
    naming the first difference, not trained with shifted classes (the files' fingerprint alone does not see it)."""
    import shutil
    import toy
    ds = tmp_path / "ds"
    shutil.copytree(toy.ensure("toy-target"), ds)
    args = [a if a != "toy-target" else "folder" for a in TINY] + ["--data-root", str(ds), "--size", "64"]
    finetune_oasis.main(["--out", str(tmp_path / "o"), *args])
    names = (ds / "classes.txt").read_text().splitlines()
    (ds / "classes.txt").write_text("\n".join([names[1], names[0], *names[2:]]) + "\n")
    refused(lambda: finetune_oasis.main(["--out", str(tmp_path / "o"), "--resume"]), "another order",
            f"class 1 is '{names[0]}'")
    (ds / "classes.txt").write_text("\n".join([*names, "pond"]) + "\n")
    refused(lambda: finetune_oasis.main(["--out", str(tmp_path / "o"), "--resume"]), "classes")


@pytest.mark.parametrize("failing", ["best.pt", "checkpoint.pt"])
def test_finish_evaluation_writes_in_its_order(tmp_path, failing):
    """run.finish_evaluation: the log line, curves.png, best.pt, then checkpoint.pt: a write that fails leaves
    the files before it written and the ones after it not (a kill between them resumes from the older checkpoint
    and redoes the evaluation). Without a failure it records its files in the manifest and returns best.stop."""
    out = tmp_path / "run"
    out.mkdir()
    (out / failing).mkdir()  # os.replace onto a folder fails: this write fails, in one line
    best = run.Best(patience=1)
    best.update(5.0, 1)
    refused(lambda: run.finish_evaluation(out, {"step": 1}, {"step": 1, "fid": 5.0}, True, best, "cpu"),
            str(out / failing), "could not write")
    assert [e["step"] for e in curves.read_log(out / "log.jsonl")] == [1] and (out / "curves.png").is_file()
    if failing == "checkpoint.pt":
        assert torch.load(out / "best.pt", weights_only=True)["step"] == 1
    assert not (out / "checkpoint.pt").is_file()
    (out / failing).rmdir()
    better = best.update(6.0, 2)  # not better: the second evaluation without improvement stops (patience 1)
    assert run.finish_evaluation(out, {"step": 2}, {"step": 2, "fid": 6.0}, better, best, "cpu")
    assert [e["step"] for e in curves.read_log(out / "log.jsonl")] == [1, 2]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert (out / "best.pt").is_file() == (failing == "checkpoint.pt")
    assert set(run.recorded_files(out)) >= {"log.jsonl", "checkpoint.pt", "curves.png"}
