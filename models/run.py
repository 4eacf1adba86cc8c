"""The run convention shared by the training scripts: one plain checkpoint dict, written atomically and
read weights-only; a run folder that is never overwritten by accident; logs that hold each step once."""
import argparse
import errno
import hashlib
import json
import os
import random
import shlex
import shutil
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from models import DataError, no_file


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
    """A weights-only torch file; `kinds` (e.g. ('oasis-cat',)) requires one of our checkpoints of that kind.

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


def prepare_out(out, resume, overwrite, flag="--out"):
    """The run folder: --resume needs <out>/checkpoint.pt; a fresh run refuses a non-empty folder unless --overwrite."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{flag} {out}: is a file, expected a folder for the run")
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise DataError(f"--resume: {out / 'checkpoint.pt'} not found; nothing to resume (drop --resume to start)")
        return out
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{flag} {out}: folder is not empty; continue the run with --resume, start over with "
                        "--overwrite, or choose another folder")
    old = ("checkpoint.pt", "best.pt", "log.jsonl", "curves.png", "subset.txt", "samples/*.png") if overwrite else ()
    return out_dir(out, flag, replaces=old)


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


def check_data(saved, now, args):
    """Refuse (one line) to resume on other training files than the run's; a checkpoint from before the
    fingerprint gets a one-line note."""
    if saved is None:
        print(f"note: {Path(args.out) / 'checkpoint.pt'} records no fingerprint of its training files (an older "
              "run); resuming without checking that --data-root still holds the same files")
        return
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
        if k in given and k not in ("out", "resume", "overwrite", "precision") and hasattr(args, k):
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
MACHINE_FLAGS = ("resume", "overwrite", "out", "device", "workers", "compile", "amp", "precision")


def resume_args(args, saved, model_flags, given):
    """Continue a run with its own settings: flags not given again come from `saved` (the checkpoint's args);
    a model/data flag given with another value is refused (one line). Other flags (steps, eval cadence) may change."""
    for k, v in saved.items():
        if k in MACHINE_FLAGS or not hasattr(args, k):
            continue
        if k not in given:
            setattr(args, k, v)
        elif k in model_flags and getattr(args, k) != v:
            raise DataError(f"--resume: --{k.replace('_', '-')} is {getattr(args, k)!r}, the run in {args.out} "
                            f"used {v!r}; model and data flags cannot change on resume")
    return args


def parse_with_given(parser, argv=None):
    """(args, given): the parsed namespace and the dests the command line set explicitly (abbreviations included).

    argparse fills only the dests a namespace lacks, so parsing once more into a namespace pre-filled with a
    marker leaves the marker exactly where the command line said nothing."""
    args = parser.parse_args(argv)
    unset = object()
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**{k: unset for k in vars(args)}))
    return args, {k for k, v in vars(probe).items() if v is not unset}


def read_log(path):
    """log.jsonl's entries (dicts), in order; [] when there is none. Only the last line may be torn (a run killed
    while writing it): it is left out; a bad line before it is one DataError line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    entries = []
    for k, ln in enumerate(lines, 1):
        try:
            entries.append(json.loads(ln))
        except ValueError:
            if k < len(lines):
                raise DataError(f"{path}: line {k} is not JSON; expected one JSON object a line") from None
    return entries


def truncate_log(path, step):
    """Drop log.jsonl lines past `step` (written after the checkpoint a resumed run restarts from)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = [json.dumps(e) for e in read_log(path) if e.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def append_log(path, entry):
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


# ----------------------------------------------------------------------------------------------
# Stateless run mechanics of the PITI scripts (finetune_piti.py, pretrain_piti.py): batch order and per-step
# seeds from (seed, step) alone, so a resumed run draws exactly what an uninterrupted one would; the EMA swap;
# the global-batch order of per-rank items. Kept together: they belong to the run toolkit.


def step_seed(seed, what, i):
    """Independent seed for (run seed, what: 0 = a step's draws, 1 = an epoch's order, index)."""
    return int(np.random.SeedSequence([seed, what, i]).generate_state(1)[0])


def batch_indices(step, n, batch, seed):
    """Items of a step: consecutive slices of per-epoch permutations (stateless, so resumes are exact)."""
    out = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, 1, epoch)))
        out.append(int(perm[i]))
    return out


def gather(x, world):
    """The global-batch order of a per-rank tensor of items rank::world (all ranks get it)."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts, 1).flatten()


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


def rng_state(device):
    """Every global RNG, as plain lists and tensors (weights_only loading accepts nothing else); the CUDA
    generator is the one of `device` (a rank's cuda:N), None on CPU."""
    np_state, py_state = np.random.get_state(), random.getstate()
    device = torch.device(device)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(s, device):
    """Restore rng_state(device)'s output; its CUDA state goes to `device`'s generator (a run resumed on CPU
    has none to restore)."""
    device = torch.device(device)
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], device)
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


# How long a rank waits in a collective: the other ranks wait in the stop-flag broadcast while rank 0 alone
# samples the grid and the val-set FID, which takes far longer than NCCL's default 10 minutes on a big val set.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def init_distributed(args):
    """(ddp, rank, world, device) for args.device: torchrun's environment (one process per GPU, NCCL; gloo on
    CPU) or a single process. args.device becomes the rank's GPU; --batch must split evenly over the ranks."""
    ddp = "RANK" in os.environ
    if ddp:
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo", timeout=COLLECTIVE_TIMEOUT)
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    if args.batch % world:
        raise DataError(f"--batch {args.batch} must be a multiple of the {world} ranks")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return ddp, rank, world, device


def broadcast_stop(stop, device):
    """Rank 0's early-stopping decision (`stop`), on every rank; as is without torchrun. The flag lives on the
    run's `device`: NCCL broadcasts CUDA tensors only."""
    if not dist.is_initialized():
        return bool(stop)
    flag = torch.tensor([int(stop)], device=device)
    dist.broadcast(flag, 0)
    return bool(flag.item())

