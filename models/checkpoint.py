"""The run convention shared by the finetuning scripts: one plain checkpoint dict, written atomically and
read weights-only; a run folder that is never overwritten by accident; logs that hold each step once."""
import argparse
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from models import DataError


def save(obj, path):
    """torch.save through a temporary file and os.replace: a killed run never leaves half a checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path, flag="--ckpt", kinds=None, mmap=False):
    """A weights-only torch file; `kinds` (e.g. ('oasis-cat',)) requires one of our checkpoints of that kind.

    Every failure is one DataError line naming the flag and the file: missing, empty, truncated, not a torch
    file, pickled objects."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{flag} {path}: {'is a folder, expected a file' if path.is_dir() else 'file not found'}")
    obj = torch_load(path, flag, mmap)
    if kinds is not None:
        kind = obj.get("kind") if isinstance(obj, dict) else None
        if kind not in kinds:
            raise DataError(f"{flag} {path}: is {'a ' + repr(kind) if kind else 'not a'} checkpoint of this toolkit; "
                            f"expected kind {' or '.join(repr(k) for k in kinds)}")
    return obj


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
    old = ("checkpoint.pt", "best.pt", "log.jsonl", "subset.txt", "samples/*.png") if overwrite else ()
    return out_dir(out, flag, replaces=old)


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


def truncate_log(path, step):
    """Drop log.jsonl lines past `step` (written after the checkpoint a resumed run restarts from)."""
    path = Path(path)
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    entries = []
    for k, ln in enumerate(lines, 1):
        try:
            entries.append((ln, json.loads(ln)))
        except ValueError:
            if k < len(lines):  # only the last line can be torn (a run killed while writing it)
                raise DataError(f"{path}: line {k} is not JSON; expected one JSON object a line") from None
    keep = [ln for ln, e in entries if e.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def append_log(path, entry):
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def rng_state():
    """Every global RNG, as plain lists and tensors (weights_only loading accepts nothing else)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


def init_distributed(args):
    """(ddp, rank, world, device) for args.device: torchrun's environment (one process per GPU, NCCL; gloo on
    CPU) or a single process. args.device becomes the rank's GPU; --batch must split evenly over the ranks."""
    ddp = "RANK" in os.environ
    if ddp:
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    if args.batch % world:
        raise DataError(f"--batch {args.batch} must be a multiple of the {world} ranks")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return ddp, rank, world, device


def key_diff(own, sd, optional=()):
    """(missing, unexpected, wrong-shape) keys of a state dict `sd` against `own` (the model's state dict);
    keys of `own` ending in one of `optional` may be absent. Each loader words its own one-line error."""
    missing = [k for k in own if k not in sd and not k.endswith(tuple(optional))]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, wrong
