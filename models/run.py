"""The run toolkit shared by the training scripts (finetune_oasis.py, finetune_piti.py, pretrain_piti.py).

- One plain checkpoint dict (with a `format` version), written atomically and read weights-only.
- A run folder: never an input folder, locked for its one writer (fcntl.flock, released when the process
  dies), its files listed in a manifest so that --overwrite removes exactly those and nothing else.
- Resume: the run's own flags, the same data (fingerprint), files recorded by size and sha256; the
  log (models/curves.py: read_log, append_log, truncate_log) holds each step once.
- Stateless randomness: a step's batch, its items' augmentations and its noise are functions of (seed, step)
  alone (`step_seed`, `batch_keys`, `Seeded`), so a resumed run draws exactly what an uninterrupted one would.
- torchrun: `init_distributed` (returns the device), the stop broadcast, one bucketed gradient average.
- `Best`: keep-best and early stopping on the validation FID; `finish_evaluation`: how every evaluation ends."""
import argparse
import errno
import fcntl
import hashlib
import os
import random
import shlex
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from models import DataError, curves, no_file


FORMAT = 2  # the checkpoint format this version writes and reads (1: before the format key; other PITI file records)


def check_format(ckpt, path, flag="--resume"):
    """One DataError line unless `ckpt` (one of our checkpoint dicts) is of FORMAT."""
    found = ckpt.get("format", 1)
    if found != FORMAT:
        raise DataError(f"{flag} {path}: checkpoint format {found}; this version of the toolkit reads format {FORMAT} "
                        f"only ({'older' if found < FORMAT else 'newer'} runs: use the version that wrote it, or train anew)")


def save(obj, path):
    """torch.save through a temporary file and os.replace: a killed run never leaves half a checkpoint. A failed
    write (a full disk) removes the temporary file and is one DataError line; the previous file stays as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's C++ writer reports a failed write as a RuntimeError (any text)
        full = getattr(e, "errno", None) == errno.ENOSPC or (
            isinstance(e, RuntimeError) and shutil.disk_usage(path.parent).free < 2 ** 20)  # full with the .tmp in it
        tmp.unlink(missing_ok=True)
        why = "no space left on the device; free some space" if full else \
            (getattr(e, "strerror", None) or str(e).strip().splitlines()[0])
        kept = "the previous one is kept" if path.exists() else "no earlier one exists"
        raise DataError(f"{path}: could not write the checkpoint ({why}); {kept}") from None


def load(path, flag="--ckpt", kinds=None, mmap=False):
    """A weights-only torch file; `kinds` (e.g. ('oasis-cat',)) requires one of our checkpoints of that kind,
    in this version's FORMAT.

    Every failure is one DataError line naming the flag and the file: missing, empty, truncated, not a torch
    file, pickled objects."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{flag} {path}: {no_file(path)}")
    obj = torch_load(path, flag, mmap)
    require_dict(obj, path, flag, "a state dict or a checkpoint of this toolkit")
    if kinds is not None:
        kind = obj.get("kind")
        if kind not in kinds:
            raise DataError(f"{flag} {path}: is {'a ' + repr(kind) if kind else 'not a'} checkpoint of this toolkit; "
                            f"expected kind {' or '.join(repr(k) for k in kinds)}")
        check_format(obj, path, flag)
    return obj


def require_dict(obj, path, flag, expected):
    """One DataError line when a torch file holds something else than a dict (a bare tensor, a list)."""
    if not isinstance(obj, dict):
        what = "a single tensor" if isinstance(obj, torch.Tensor) else f"a {type(obj).__name__}"
        raise DataError(f"{flag + ' ' if flag else ''}{path}: {what}, not a state dict / checkpoint; expected {expected}")


def torch_load(path, flag=None, mmap=False):
    """torch.load(weights_only=True) of an existing file; a failure is one DataError line saying why."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # zip / pickle errors say little: name the cause
        if mmap and "mmap can only be used" in str(e):  # an old (non-zip) torch file: read it whole
            return torch_load(path, flag, mmap=False)
        raise DataError(f"{flag + ' ' if flag else ''}{path}: {unreadable_why(path, e)}") from None


def unreadable_why(path, e):
    """Why torch.load failed on `path`, in a few words: empty, truncated, not a torch file, pickled objects."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    with open(path, "rb") as f:
        head = f.read(4)
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes); expected a torch file"
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # neither a torch.save zip nor an old-style pickle
        return f"is not a torch file (it starts with {head!r}; expected a file written by torch.save)"
    if "weights_only" in text or "Weights only" in text or "Unsupported global" in text:
        return "holds pickled Python objects, which weights_only loading refuses (it would run their code)"
    if head == b"PK\x03\x04":  # a zip archive, the torch.save format, that cannot be read to its end
        return f"is truncated or corrupt ({size} bytes; an interrupted write, copy or download?)"
    if "EOF" in text or "corrupted" in text or isinstance(e, EOFError):
        return f"is truncated ({size} bytes; an interrupted write, copy or download?)"
    return f"cannot be read ({type(e).__name__}: {text[:120]})"


def out_dir(path, flag="--out", keep=True, replaces=()):
    """An output folder that may already hold files (evaluation results, an affinity): created and checked
    writable, or one DataError line (a file in the way, a read-only file system, no permission). keep=False
    only checks: the folders it made for the check are removed again (a script that may still refuse its
    other inputs leaves nothing behind). `replaces`: an earlier run's outputs that this run rewrites, removed
    now, so that a run that fails leaves no number that looks like its own; names or glob patterns for the
    folders of images a run writes ('images/*.png'): a rerun shows no image of another run."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{flag} {path}: is a file, expected a folder")
    made = [d for d in (path, *path.parents) if not d.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
        for name in replaces:
            for f in path.glob(name):
                if f.is_file():
                    f.unlink()
    except OSError as e:
        raise DataError(f"{flag} {path}: cannot write there ({e.strerror})") from None
    if not keep:
        for d in made:  # deepest first
            d.rmdir()
    return path


def prepare_out(out, resume, overwrite, inputs, flag="--out"):
    """The run folder, checked and locked before anything is written: never an input folder (`inputs`:
    {flag: path}, see check_out_vs_inputs); --resume needs <out>/checkpoint.pt; a fresh run refuses a non-empty
    folder unless --overwrite, which removes the files the earlier run recorded in its manifest (and nothing
    else). The lock is held until the process ends."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{flag} {out}: is a file, expected a folder for the run")
    if resume and overwrite:
        raise DataError("--resume continues the run in --out, --overwrite starts it over: give one of the two")
    check_out_vs_inputs(out, inputs, flag)
    if resume and not (out / "checkpoint.pt").is_file():
        raise DataError(f"--resume {out / 'checkpoint.pt'}: {no_file(out / 'checkpoint.pt')}; nothing to resume (drop "
                        "--resume to start)")
    if not resume and not overwrite and out.is_dir() and any(f.name != LOCK for f in out.iterdir()):
        raise DataError(f"{flag} {out}: folder is not empty; continue the run with --resume, start over with "
                        "--overwrite, or choose another folder")
    lock(out_dir(out, flag), flag)
    if overwrite:
        kept = remove_recorded(out)
        foreign = [k for k in kept if Path(k).parts[0] in RUN_FILES]
        if foreign:
            raise DataError(f"--overwrite: {out / foreign[0]} was not recorded by a run of this toolkit (no "
                            f"{MANIFEST} lists it) and a run would write there; remove it yourself or choose another "
                            f"{flag}")
        if kept:
            print(f"note: {flag} {out}: kept {len(kept)} file(s) no run of this toolkit recorded writing, e.g. "
                  f"{kept[0]} (--overwrite removes only a run's own files)")
    return out


def flag_paths(args, names, data_root=None):
    """{--flag: value} of a script's input flags (dests `names`), plus --data-root as `data_root` (a toy task's
    generated folder when no --data-root is given): the `inputs` of prepare_out."""
    return {"--data-root": args.data_root or data_root, **{"--" + k.replace("_", "-"): getattr(args, k) for k in names}}


def check_out_vs_inputs(out, inputs, flag="--out"):
    """One DataError line when the output folder `out` equals, contains or lies inside an input folder, or is
    the folder of an input file: a run never writes into (or deletes from) what it reads. `inputs`: {flag: path}
    (None values skipped); a folder input is compared as a folder, a file input by the folder it lies in."""
    o = Path(os.path.abspath(out)).resolve()
    for name, path in inputs.items():
        if path is None or not Path(path).exists():  # not a file or folder (a name, 'none'): nothing to write into
            continue
        p = Path(os.path.abspath(path)).resolve()
        if p.is_dir():
            how = ("is" if o == p else "lies inside" if p in o.parents else "contains" if o in p.parents else None)
        else:
            how = "is the folder of" if o == p.parent else "contains" if o in p.parents else None
        if how:
            raise DataError(f"{flag} {out}: {how} {name} {path}; a run never writes into its inputs: choose an "
                            f"{flag} outside it")


# ----------------------------------------------------------------------------------------------
# One writer per run folder, and a manifest of what the run wrote

LOCK, MANIFEST = ".lock", "manifest.txt"
# what a training run writes in its folder (files, and folders of files)
RUN_FILES = ("checkpoint.pt", "best.pt", "log.jsonl", "curves.png", "subset.txt", "samples", "fid_cache", "tensorboard",
             "base.pt", "upsampler.pt")
_HELD = {}  # run folder -> open lock file: the lock lives as long as this process


def lock(out, flag="--out"):
    """Take the run folder's lock (an exclusive fcntl.flock on <out>/.lock, which the OS releases when the
    process ends, even on kill -9): a second writer gets one DataError line naming the PID that holds it."""
    out = Path(out)
    key = str(out.resolve())
    if key in _HELD:
        return
    f = open(out / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise DataError(f"{flag} {out}: another process (PID {pid}) is writing this run folder; wait until it "
                        "ends (or stop it), or choose another folder") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _HELD[key] = f


def record(out, paths=RUN_FILES):
    """Add files this run wrote (paths inside `out`; a folder stands for the files in it now, all written by
    the run; paths not there are skipped) to <out>/manifest.txt, the list --overwrite (and evaluate.py's rerun)
    may remove. The default, RUN_FILES, is safe for a training run: prepare_out refuses to start one where
    any of them holds a file no run recorded."""
    out = Path(out)
    have = recorded_files(out)
    new = []
    for p in paths:
        p = out / p if not Path(p).is_absolute() else Path(p)
        for f in (sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p] if p.is_file() else []):
            rel = os.path.relpath(f, out)
            if rel not in have and not rel.startswith(".."):
                have.append(rel)
                new.append(rel)
    if new:
        tmp = out / (MANIFEST + ".tmp")
        tmp.write_text("".join(r + "\n" for r in have))
        os.replace(tmp, out / MANIFEST)


def recorded_files(out):
    """The relative paths <out>/manifest.txt lists ([] without one)."""
    path = Path(out) / MANIFEST
    return [ln for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def remove_recorded(out):
    """Remove the files an earlier run recorded in <out>/manifest.txt (and the folders they leave empty), then
    the manifest; -> the files left that no run recorded (kept)."""
    out = Path(out)
    root = out.resolve()
    for rel in recorded_files(out):
        f = out / rel
        if f.is_file() and root in f.resolve().parents:  # never outside the run folder (a link, a '..')
            f.unlink()
            for d in f.parents:
                if d == out or any(d.iterdir()):
                    break
                d.rmdir()
    (out / MANIFEST).unlink(missing_ok=True)
    return sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file() and f.name != LOCK)


def refuse_unrecorded(out, names, flag="--out"):
    """After remove_recorded: a file still at one of the paths `names` a run is about to write was not written
    by a run of this toolkit (no manifest lists it): one DataError line, before anything is overwritten."""
    clash = next((n for n in names if (Path(out) / n).exists()), None)
    if clash is not None:
        raise DataError(f"{flag} {out}: {clash} is not a file of an earlier run (no {MANIFEST} lists it) and this run "
                        f"would overwrite it; move it away or choose another {flag}")


# ----------------------------------------------------------------------------------------------
# Files a checkpoint depends on (PITI's official base/upsampler): recorded by content, found again when moved


def file_record(path):
    """{"path": as given, "size", "sha256"} of an input file a checkpoint depends on."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return {"path": str(path), "size": os.path.getsize(path), "sha256": h.hexdigest()}


def find_recorded_file(record, override=None, flag="--base", near=()):
    """The file a checkpoint recorded (file_record's dict): `override` (a flag's value) when given, else the
    recorded path as given, else the same name under one of the folders `near` (e.g. the run folder). Its size
    and sha256 must match the record (a moved file is fine, another one is not); one DataError line otherwise."""
    if override is not None:
        candidates = [Path(override)]
        if not candidates[0].is_file():
            raise DataError(f"{flag} {override}: {no_file(override)}")
    else:
        rel = Path(record["path"])
        candidates = [rel] + [Path(d) / rel for d in near if not rel.is_absolute()] + [Path(d) / rel.name for d in near]
    for c in candidates:
        if c.is_file():
            if os.path.getsize(c) != record["size"] or file_record(c)["sha256"] != record["sha256"]:
                raise DataError(f"{flag} {c}: not the file the run used ({record['path']}, {record['size']} bytes, "
                                f"sha256 {record['sha256'][:12]}...); pass that file with {flag}")
            return c
    raise DataError(f"{flag}: the run's file {record['path']} is not there (moved?); pass it with {flag} FILE "
                    f"(its sha256 {record['sha256'][:12]}... is checked)")


def machine_flags(args):
    """A training script's machine flags, checked before any file is written: --device, --workers (default 4 on
    CUDA, 0 on the CPU; never from a resumed run's checkpoint), --tensorboard (the package is installed)."""
    check_device(args.device)
    if args.workers is None:
        args.workers = 4 if args.device.startswith("cuda") else 0
    if args.tensorboard:
        curves.require_tensorboard()


def check_device(name, flag="--device"):
    """One DataError line unless `name` is a device this machine has: cpu, cuda, cuda:N (N < the GPUs visible), mps."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DataError(f"{flag} {name!r}: not a device name; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DataError(f"{flag} {name}: no CUDA GPU visible (torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= n:
            raise DataError(f"{flag} {name}: only {n} CUDA GPU(s) visible; use cuda:0 .. cuda:{n - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DataError(f"{flag} {name}: no Apple MPS device available; use --device cpu")
    elif device.type != "cpu":
        raise DataError(f"{flag} {name}: {device.type} devices are not supported; expected cpu, cuda or cuda:N")


def data_fingerprint(ds):
    """What a run trained on, cheaply: the number of image/label pairs and a hash of their paths (relative to
    the dataset root) and byte sizes. Stored in a run's checkpoint; `check_data` compares it on --resume."""
    h = hashlib.sha1()
    for pair in ds.files:
        for f in pair:
            h.update(f"{os.path.relpath(f, ds.root)}\0{os.path.getsize(f)}\0".encode())
    return {"pairs": len(ds.files), "sha1": h.hexdigest()}


def check_data(ckpt, classes, now, args, compare_classes):
    """Refuse (one line) to resume on other data than the run's: other `classes` (the dataset's ClassTable, by
    `compare_classes`, i.e. data.compare_classes: models/ never imports data.py), then other files (`now`, their
    data_fingerprint), compared by content, not by the spelling of --data-root: a moved dataset resumes."""
    compare_classes(ckpt["target"]["names"], classes, f"the run in {args.out}", f"--data {args.data} now")
    saved = ckpt["data"]
    if saved == now:
        return
    a, b = saved["pairs"], now["pairs"]
    what = (f"{a} image/label pairs then, {b} now ({abs(b - a)} {'added' if b > a else 'removed'})" if a != b else
            f"the same {a} pairs by count, but names or file sizes differ")
    where = f"--data-root {args.data_root}" if args.data_root else f"--data {args.data}"
    raise DataError(f"{where}: the training files changed since the run in {args.out} "
                    f"was saved ({what}); resuming would train on other data. Start over with --overwrite, or "
                    "use a new --out")


def resume_command(script, args, given):
    """The command line that continues this run: --out, --resume and the machine flags given this time."""
    parts = ["python", script, "--out", str(args.out), "--resume"]
    for k in MACHINE_FLAGS:
        if k in given and k not in ("out", "resume", "overwrite") and hasattr(args, k):
            v = getattr(args, k)
            flag = "--" + k.replace("_", "-")
            parts += [flag] if v is True else [] if v is False else [flag, str(v)]
    return shlex.join(parts)


def interrupted(script, args, given, step):
    """The KeyboardInterrupt a finetuning loop raises on Ctrl-C: its one line (printed by models.cli) says where
    the run can continue from."""
    ckpt = Path(args.out) / "checkpoint.pt"
    if step is None:
        return KeyboardInterrupt("no checkpoint written yet; start again with --overwrite (or a new --out)")
    return KeyboardInterrupt(f"last checkpoint {ckpt} (step {step}); continue with: "
                             f"{resume_command(script, args, given)}")


# flags that describe the machine a run is on, not the run: never taken from a checkpoint
MACHINE_FLAGS = ("resume", "overwrite", "out", "device", "workers", "compile", "amp")


# path flags: compared as normalised absolute paths on --resume; MOVABLE ones may name another place, checked
# by content (--data-root by the data fingerprint, PITI's --base/--upsampler by sha256)
PATH_FLAGS = ("data_root", "source_root", "source_ckpt", "source_d", "affinity", "subset_file", "base", "upsampler",
              "glide_ckpt", "glide_up_ckpt", "encoder")
MOVABLE = ("data_root", "base", "upsampler")


def same_path(a, b):
    return a == b or (a is not None and b is not None and
                      os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b)))


def resume_args(args, saved, model_flags, given):
    """Continue a run with its own settings: flags not given again come from `saved` (the checkpoint's args);
    a model/data flag given with another value is refused (one line); paths are compared normalised, and a
    MOVABLE one may change (its content is checked). Other flags (steps, eval cadence) may change."""
    for k, v in saved.items():
        if k in MACHINE_FLAGS or not hasattr(args, k):
            continue
        if k not in given:
            setattr(args, k, v)
        elif k in model_flags and k not in MOVABLE and not (
                same_path(getattr(args, k), v) if k in PATH_FLAGS else getattr(args, k) == v):
            raise DataError(f"--resume: --{k.replace('_', '-')} is {getattr(args, k)!r}, the run in {args.out} "
                            f"used {v!r}; model and data flags cannot change on resume")
    return args


def resumed_args(args, given, model_flags, kinds):
    """With --resume (and not --overwrite, which prepare_out refuses): the checkpoint in --out (of `kinds`,
    read memory-mapped), whose flags complete `args` (resume_args); None otherwise, or when there is no
    checkpoint (prepare_out says so)."""
    path = Path(args.out) / "checkpoint.pt"
    if not args.resume or args.overwrite or not path.is_file():
        return None
    ckpt = load(path, "--resume", kinds=kinds, mmap=True)
    resume_args(args, ckpt["args"], model_flags, given)
    if same_path(args.subset_file, path.parent / "subset.txt"):  # the run's own subset (read again), not an input
        args.subset_file = None
    return ckpt


def require_flags(args, names, example):
    """Refuse every flag of `names` that is None at once, in one line ending with a command to copy."""
    missing = ["--" + n.replace("_", "-") for n in names if getattr(args, n) is None]
    if missing:
        raise DataError(f"missing {', '.join(missing)}; for example: {example}")


def parse_with_given(parser, argv=None):
    """(args, given): the parsed namespace and the dests the command line set explicitly (abbreviations included).

    argparse fills only the dests a namespace lacks, so parsing once more into a namespace pre-filled with a
    marker leaves the marker exactly where the command line said nothing."""
    args = parser.parse_args(argv)
    unset = object()
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**{k: unset for k in vars(args)}))
    return args, {k for k, v in vars(probe).items() if v is not unset}


# ----------------------------------------------------------------------------------------------
# Stateless randomness: everything a step draws is a function of (run seed, step), so a resumed run draws
# exactly what an uninterrupted one would, whatever the number of data-loader workers.


def step_seed(seed, what, i):
    """An independent seed for (run seed, what, index). what: 0 = a step's draws (noise, t, dropout), 1 = an
    epoch's order, 2 = an item's augmentation, 3 = the batches of an evaluation's BN pass."""
    return int(np.random.SeedSequence([seed, what, i]).generate_state(1)[0])


def batch_keys(seed, step, n, batch, rank=0, world=1):
    """This rank's items of global batch `step`, as (index, augmentation seed) keys for `Seeded`: positions
    step*batch .. (step+1)*batch of the concatenated per-epoch permutations of the n items, items k::world of
    it on rank k (the global batch is the same for any number of ranks)."""
    keys, perms = [], {}
    for pos in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, 1, epoch)))
        keys.append((int(perms[epoch][i]), step_seed(seed, 2, pos)))
    return keys[rank::world]


class Batches(torch.utils.data.Sampler):
    """The batch sampler of a run: batch_keys for steps start, start+1, ... (endless)."""

    def __init__(self, seed, n, batch, rank=0, world=1, start=0):
        self.seed, self.n, self.batch, self.rank, self.world, self.start = seed, n, batch, rank, world, start

    def __iter__(self):
        step = self.start
        while True:
            yield batch_keys(self.seed, step, self.n, self.batch, self.rank, self.world)
            step += 1


class Seeded(torch.utils.data.Dataset):
    """A dataset read by (index, seed) keys: the item's augmentation (Python `random`, as the official
    loaders) is seeded from its key, and the global `random` state is left as it was."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        i, seed = key
        state = random.getstate()
        random.seed(seed)
        try:
            return self.ds[i]
        finally:
            random.setstate(state)


def loader(ds, seed, batch, rank, world, start, workers, device):
    """The run's DataLoader: Seeded items in Batches' order from step `start`."""
    return torch.utils.data.DataLoader(Seeded(ds), batch_sampler=Batches(seed, len(ds), batch, rank, world, start),
                                       num_workers=workers, pin_memory=torch.device(device).type == "cuda",
                                       persistent_workers=workers > 0)


def seed_step(seed, step, rank=0):
    """Seed the global torch RNG (CPU and every GPU) for step `step` of rank `rank`: noise, dropout, LabelMix."""
    torch.manual_seed(step_seed(seed, 0, step) + rank)


# ----------------------------------------------------------------------------------------------
# Keep-best and early stopping


@dataclass
class Best:
    """The validation FID's best value, its step and the evaluations since without a better one."""
    patience: int
    fid: float = None
    step: int = None
    bad: int = 0

    def update(self, fid, step):
        """Count an evaluation's FID; True when it is the best so far (best.pt is then written)."""
        better = self.fid is None or fid < self.fid
        self.fid, self.step, self.bad = (fid, step, 0) if better else (self.fid, self.step, self.bad + 1)
        return better

    @property
    def stop(self):
        return self.bad >= self.patience

    def line(self, step, fid, what=""):
        """An evaluation's console line (after `update`): its FID, what measured it ('250+fast27 steps'), the best."""
        at = f"best {self.fid:.2f} at step {self.step}"
        return f"step {step}: validation FID {fid:.2f} " + (f"({what}), {at}" if what else f"({at})")

    def summary(self, path):
        """The end of a run's last line (`path`: its best.pt): ', best FID <fid> at step <step> (<path>)' or ''."""
        return f", best FID {self.fid:.2f} at step {self.step} ({path})" if self.fid is not None else ""

    def state(self):
        """The checkpoint's keys for it."""
        return {"best_fid": self.fid, "best_step": self.step, "bad_evals": self.bad}

    @classmethod
    def resume(cls, ckpt, args):
        """The resumed run's tracker; a fresh one when it measures FID with another network (fid_network_changed)."""
        if fid_network_changed(ckpt["args"], args):
            return cls(args.patience)
        return cls(args.patience, ckpt["best_fid"], ckpt["best_step"], ckpt["bad_evals"])


def finish_evaluation(out, state, entry, better, best, device, board=None):
    """The end of an evaluation on rank 0, in this order: log line `entry`, curves.png (+ TensorBoard events with
    a curves.Board), best.pt when `better`, checkpoint.pt (both `state`), the manifest; -> best.stop on every
    rank (the other ranks call broadcast_stop alone). A run killed after the log line or best.pt resumes from the
    older checkpoint, which drops the later log lines and redoes this evaluation (best.pt included)."""
    curves.append_log(Path(out) / "log.jsonl", entry)
    curves.update(out, board)
    if better:
        save(state, Path(out) / "best.pt")
    save(state, Path(out) / "checkpoint.pt")
    record(out)  # what --overwrite may remove
    return broadcast_stop(best.stop, device)


def no_fid_note(out, also=""):
    """The note a run without --inception/--fid-features prints once at its start: no best.pt will be written."""
    print(f"note: no --inception or --fid-features, so no validation FID, no early stopping and no best.pt; "
          f"evaluate {Path(out) / 'checkpoint.pt'} (the last evaluation's model){also}")


def fid_network_changed(saved, args):
    """A note (and True) when a resumed run measures FID with another network than the run did: best-FID
    tracking then starts anew instead of comparing FIDs of two networks."""
    then = (saved.get("inception"), saved.get("fid_features"))
    now = (args.inception, args.fid_features)
    if then == now or not any(then):
        return False
    print(f"note: the run measured FID with {then[0] or then[1]}, this resume with {now[0] or now[1] or 'none'}: "
          "best-FID tracking and early stopping start anew")
    return True


@contextmanager
def swapped(params, ema):
    """Temporarily put the EMA weights into the model (only the trained tensors are copied)."""
    raw = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(ema[k])
    try:
        yield
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(raw[k])


def gather(x, world):
    """The global-batch order of a per-rank tensor of items rank::world (all ranks get it)."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts, 1).flatten()


def restore_optimizer(opt, state, lr):
    """Load an optimiser's state from a checkpoint, with the command line's learning rate (e.g. to continue
    slower)."""
    opt.load_state_dict(state)
    for group in opt.param_groups:
        group["lr"] = lr


def mean_over_ranks(x, world):
    """The mean of a tensor over the torchrun ranks (as is in one process): a NaN anywhere reaches every rank."""
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return x


def average_gradients(params, world):
    """The global batch's gradient under torchrun: each rank's gradients (its equal share's mean) averaged over
    the ranks in one bucketed all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, f in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(f.view_as(g))


# How long a rank waits in a collective: the other ranks wait in the stop-flag broadcast while rank 0 alone
# samples the grid and the val-set FID, which takes far longer than NCCL's default 10 minutes on a big val set.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def init_distributed(device, batch):
    """(ddp, rank, world, device) for --device `device`: torchrun's environment (one process per GPU, NCCL;
    gloo on CPU) or a single process. Under torchrun the device is the rank's GPU; --batch must split evenly."""
    ddp = "RANK" in os.environ
    if ddp:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=COLLECTIVE_TIMEOUT)
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    if batch % world:
        raise DataError(f"--batch {batch} must be a multiple of the {world} ranks")
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return ddp, rank, world, device


def finish(ddp):
    """The end of a torchrun run: its process group goes (nothing to do in one process)."""
    if ddp:
        dist.destroy_process_group()


def broadcast_stop(stop, device):
    """Rank 0's early-stopping decision (`stop`), on every rank; as is without torchrun. The flag lives on the
    run's `device`: NCCL broadcasts CUDA tensors only."""
    if not dist.is_initialized():
        return bool(stop)
    flag = torch.tensor([int(stop)], device=device)
    dist.broadcast(flag, 0)
    return bool(flag.item())

