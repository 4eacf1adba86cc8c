"""models/state_dict.py: the one reader of weight files and the one strict loader every model file uses."""
import pytest
import torch
import torch.nn as nn

from models import DataError
from models.state_dict import load_strict, read_state_dict


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


def one_line(fn):
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_a_matching_state_dict_loads_every_tensor():
    src, dst = net(), nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        src[1].running_mean.add_(1.5)
    assert load_strict(dst, src.state_dict(), "x.pth", "the test net") is dst
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_missing_unexpected_and_wrong_shape_keys_are_named_in_one_line():
    sd = net().state_dict()
    sd.pop("2.bias")
    sd["3.weight"] = torch.zeros(1)
    sd["0.weight"] = torch.zeros(5, 3, 3, 3)
    msg = one_line(lambda: load_strict(net(), sd, "--flag x.pth", "the test net"))
    assert msg.startswith("--flag x.pth: not the test net: ")
    assert "1 key missing (2.bias)" in msg
    assert "1 key unexpected (3.weight)" in msg
    assert "1 key of another shape (0.weight has shape (5, 3, 3, 3), expected (4, 3, 3, 3))" in msg
    # each kind alone says only itself
    only_missing = {k: v for k, v in net().state_dict().items() if k not in ("0.bias", "2.bias", "2.weight")}
    msg = one_line(lambda: load_strict(net(), only_missing, "x.pth", "the test net"))
    assert "3 keys missing (0.bias, 2.weight, +1 more)" in msg and "unexpected" not in msg and "shape" not in msg


def test_nothing_is_loaded_when_the_file_does_not_fit():
    dst = net()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    sd = {k: torch.full_like(v, 7.0) for k, v in dst.state_dict().items()}
    sd["extra"] = torch.zeros(1)
    one_line(lambda: load_strict(dst, sd, "x.pth", "the test net"))
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in before.items())


def test_hint_is_added_and_only_computed_on_a_mismatch():
    calls = []

    def hint(sd):
        calls.append(len(sd))
        return "has 5 classes, the net expects 4"
    load_strict(net(), net().state_dict(), "x.pth", "the test net", hint=hint)
    assert calls == []
    sd = {**net().state_dict(), "0.weight": torch.zeros(5, 3, 3, 3)}
    msg = one_line(lambda: load_strict(net(), sd, "x.pth", "the test net", hint=hint))
    assert msg.endswith("; has 5 classes, the net expects 4") and calls == [len(sd)]
    assert one_line(lambda: load_strict(net(), sd, "x.pth", "the test net", hint="try the other file")).endswith(
        "; try the other file")


def test_optional_keys_may_be_absent_on_either_side():
    src, dst = net(), net()
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd["1._tmp_running_mean"] = torch.zeros(4)  # a buffer some files carry and the module has not
    with torch.no_grad():
        dst[1].num_batches_tracked.fill_(3)
    load_strict(dst, sd, "x.pth", "the test net", optional=("num_batches_tracked", "_tmp_running_mean"))
    assert dst[1].num_batches_tracked.item() == 3  # kept the module's own value
    assert torch.equal(dst[0].weight, src[0].weight)
    # an optional name matches a whole key or its last parts, not any ending
    msg = one_line(lambda: load_strict(net(), {**sd, "1.xnum_batches_tracked": torch.zeros(())}, "x.pth",
                                       "the test net", optional=("num_batches_tracked", "_tmp_running_mean")))
    assert "1 key unexpected (1.xnum_batches_tracked)" in msg


def test_a_partial_load_keeps_what_it_leaves_out():
    src, dst = net(), net()
    with torch.no_grad():
        dst[0].weight.add_(1)
    keep = dst[0].weight.clone()
    load_strict(dst, {**dst.state_dict(), "2.weight": src[2].weight.detach()}, "ckpt.pt", "the trained subset")
    assert torch.equal(dst[0].weight, keep) and torch.equal(dst[2].weight, src[2].weight)


@pytest.mark.parametrize("obj, found", [
    (torch.zeros(3), "it holds a single tensor"),
    ([torch.zeros(3)], "it holds a list"),
    ({}, "it holds an empty dict"),
    ({"w": torch.zeros(1), "epoch": 3}, "it holds a dict whose 'epoch' is not a tensor (int; keys w, epoch)"),
])
def test_read_state_dict_words_what_the_file_holds(tmp_path, obj, found):
    torch.save(obj, tmp_path / "f.pt")
    msg = one_line(lambda: read_state_dict(tmp_path / "f.pt", "--weights", "the test weights", fix="get f.pt"))
    assert msg == f"--weights {tmp_path / 'f.pt'}: not the test weights: {found}; get f.pt"


def test_read_state_dict_missing_truncated_and_unwrapped(tmp_path):
    msg = one_line(lambda: read_state_dict(tmp_path / "nope.pt", None, "the test weights", fix="get nope.pt"))
    assert msg == f"{tmp_path / 'nope.pt'}: file not found; expected the test weights; get nope.pt"
    torch.save({"w": torch.ones(2)}, tmp_path / "f.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "f.pt").read_bytes()[:200])
    msg = one_line(lambda: read_state_dict(tmp_path / "cut.pt", "--weights", "the test weights", fix="get it again"))
    assert msg.startswith(f"--weights {tmp_path / 'cut.pt'}: is truncated") and msg.endswith("; get it again")
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "wrapped.pt")
    sd = read_state_dict(tmp_path / "wrapped.pt", unwrap=lambda o: o["state_dict"] if isinstance(o, dict) else o)
    assert list(sd) == ["w"] and torch.equal(sd["w"], torch.ones(2))


def test_the_palette_is_neutral_and_oasis_paths_never_import_piti():
    """models/palette.py: the colours models.piti's encoder eats; metrics and the OASIS scripts draw with them
    without importing PITI (a fresh interpreter, so that no other test's import hides it)."""
    import subprocess
    import sys
    from pathlib import Path

    from models import piti
    from models.palette import palette
    assert piti.palette is palette  # one palette: the encoder's input colours are the grids' colours
    assert palette(4).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]  # pix2pixHD's first colours
    code = ("import sys, metrics, evaluate, estimate_affinity, finetune_oasis; "
            "print(sorted(m for m in sys.modules if m.startswith('models.piti')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
