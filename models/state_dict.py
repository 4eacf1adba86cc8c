"""Pretrained weights in, the one way every loader does it: `read_state_dict` reads a file that must hold a
flat {key: tensor} dict, `load_strict` puts such a dict into a module with strict=True after naming, in one
line, every key that is missing, unexpected or of another shape. A model file adds only what is its own: how
to unwrap its files (`unwrap`), which buffers old files may lack (`optional`) and a `hint` that says in its
terms why a file does not fit ("has 151 label channels, --source cityscapes expects 35")."""
from pathlib import Path

import torch

from models import DataError, no_file
from models.run import torch_load


def read_state_dict(path, flag=None, what="a state dict of tensors", unwrap=None, fix=None):
    """The non-empty {key: tensor} dict a torch file holds (weights-only), or one DataError line.

    flag: the command-line flag that named the file (put before it in the message), or None.
    what: what the file should be, in words ("the FID Inception weights (pt_inception-...pth)").
    unwrap: obj -> obj, applied to whatever the file holds before it is checked (a checkpoint's
    'state_dict', a 'module.' prefix); it gets any object and returns it as is when it does not apply.
    fix: where to get the right file, added to every message."""
    where = f"{flag} {path}" if flag else str(path)
    tail = f"; {fix}" if fix else ""
    if not Path(path).is_file():
        raise DataError(f"{where}: {no_file(path)}; expected {what}{tail}")
    try:
        obj = torch_load(path, flag)  # truncated, empty, pickled, not a torch file: one line saying which
    except DataError as e:
        raise DataError(f"{e}{tail}") from None
    if unwrap is not None:
        obj = unwrap(obj)
    found = _not_tensors(obj)
    if found:
        raise DataError(f"{where}: not {what}: it holds {found}{tail}")
    return obj


def _not_tensors(obj):
    """What `obj` is when it is not a non-empty dict of tensors, in a few words; '' when it is one."""
    if torch.is_tensor(obj):
        return "a single tensor"
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    if not obj:
        return "an empty dict"
    bad = next((k for k, v in obj.items() if not torch.is_tensor(v)), None)
    if bad is not None:
        keys = ", ".join(str(k) for k in list(obj)[:4]) + (", ..." if len(obj) > 4 else "")
        return f"a dict whose {bad!r} is not a tensor ({type(obj[bad]).__name__}; keys {keys})"
    return ""


def _is_optional(key, optional):
    return any(key == o or key.endswith("." + o) for o in optional)


def mismatch(own, sd, optional=()):
    """(missing, unexpected, wrong-shape) keys of `sd` against `own` (a module's state dict). A key named in
    `optional`, or whose last parts are one of them ('num_batches_tracked'), may be absent on either side."""
    missing = [k for k in own if k not in sd and not _is_optional(k, optional)]
    unexpected = [k for k in sd if k not in own and not _is_optional(k, optional)]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, wrong


def _names(keys, n=2):
    return ", ".join(keys[:n]) + (f", +{len(keys) - n} more" if len(keys) > n else "")


def mismatch_line(own, sd, missing, unexpected, wrong):
    """'2 keys missing (a, b), 1 key unexpected (c), 1 key of another shape (w has shape (3,), expected (4,))'."""
    def count(keys):
        return f"{len(keys)} key{'s' if len(keys) > 1 else ''}"
    parts = [f"{count(missing)} missing ({_names(missing)})"] if missing else []
    parts += [f"{count(unexpected)} unexpected ({_names(unexpected)})"] if unexpected else []
    if wrong:
        k = wrong[0]
        more = f", +{len(wrong) - 1} more" if len(wrong) > 1 else ""
        parts.append(f"{count(wrong)} of another shape ({k} has shape {tuple(sd[k].shape)}, expected "
                     f"{tuple(own[k].shape)}{more})")
    return ", ".join(parts)


def load_strict(module, sd, path, what, optional=(), hint=None, assign=False):
    """Load `sd` into `module` with strict=True, or raise one DataError line naming `path`, `what` the file
    should be, its missing, unexpected and wrong-shape keys, and the `hint`.

    path: how the file is named in the message (e.g. '--inception x.pth', or 'the checkpoint's base weights').
    optional: keys that may be absent on either side (see `mismatch`): a module key missing from `sd` keeps
    its value, an extra optional key in `sd` is dropped. A partial load (the trained subset of a model) passes
    {**module.state_dict(), **subset} instead, so that what it leaves out is said, not implied.
    hint: a string, or sd -> string or None, the model's own words for the mismatch; only called on one.
    assign: load_state_dict's assign (a module built on the meta device takes the tensors themselves)."""
    own = module.state_dict()
    missing, unexpected, wrong = mismatch(own, sd, optional)
    if missing or unexpected or wrong:
        said = hint(sd) if callable(hint) else hint
        raise DataError(f"{path}: not {what}: {mismatch_line(own, sd, missing, unexpected, wrong)}"
                        + (f"; {said}" if said else ""))
    full = {k: v for k, v in sd.items() if k in own}
    full.update({k: v for k, v in own.items() if k not in sd})  # only optional keys are left out of `sd`
    module.load_state_dict(full, strict=True, assign=assign)
    return module
