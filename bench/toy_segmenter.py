"""Train the toy task's evaluation networks: a segmenter (for mIoU) and a feature net (for toy FID).

They play the part of the paper's DRN/UperNet evaluators and of Inception: trained on the *full* toy
target training set (never on the n-shot subset alone), used only to score generated images.
Both are saved as TorchScript files in the convention evaluate.py reads: input float images
(B,3,H,W) in [0,1]; the segmenter returns logits over the dataset's channels (channel 0 = dontcare),
the feature net returns (B, 64) pooled features. FID on these features is a toy-domain FID, not
comparable to Inception FID.

    python bench/toy_segmenter.py --out runs/toy/evalnets        # about a minute on a 2-core CPU
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import metrics  # noqa: E402


def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ToySegmenter(nn.Module):
    """A small U-Net: 3 scales, skip connections, logits at input resolution."""

    def __init__(self, n_channels, width=32):
        super().__init__()
        w = width
        self.enc1, self.enc2, self.enc3 = block(3, w), block(w, 2 * w), block(2 * w, 2 * w)
        self.dec2, self.dec1 = block(4 * w, w), block(2 * w, w)
        self.head = nn.Conv2d(w, n_channels, 1)

    def encode(self, x):
        x = x * 2 - 1  # [0,1] -> [-1,1]
        e1 = self.enc1(x)
        e2 = self.enc2(F.avg_pool2d(e1, 2))
        e3 = self.enc3(F.avg_pool2d(e2, 2))
        return e1, e2, e3

    def forward(self, x):
        e1, e2, e3 = self.encode(x)
        d2 = self.dec2(torch.cat([e2, F.interpolate(e3, size=e2.shape[2:], mode="nearest")], 1))
        d1 = self.dec1(torch.cat([e1, F.interpolate(d2, size=e1.shape[2:], mode="nearest")], 1))
        return self.head(d1)


class ToyFeatures(nn.Module):
    """Global average of the segmenter's deepest features: what a toy-domain FID compares."""

    def __init__(self, seg):
        super().__init__()
        self.seg = seg

    def forward(self, x):
        return self.seg.encode(x)[2].mean(dim=(2, 3))


def batches(ds, batch_size, shuffle, gen):
    order = torch.randperm(len(ds), generator=gen).tolist() if shuffle else list(range(len(ds)))
    for i in range(0, len(order), batch_size):
        items = [ds[j] for j in order[i:i + batch_size]]
        yield torch.stack([it["image"] for it in items]) * 0.5 + 0.5, torch.stack([it["label"] for it in items])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="toy-target", choices=["toy-target", "toy-source", "folder"])
    p.add_argument("--data-root", default=None, help="dataset folder (default: the generated toy task)")
    p.add_argument("--size", type=int, default=None, help="image side (toy default 64)")
    p.add_argument("--out", required=True, help="output folder for segmenter.pt and features.pt")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--max-train", type=int, default=None, help="use only the first N training images (tests)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train = data.open_dataset(args.data, args.data_root, "train", augment=True, size=args.size)
    val = data.open_dataset(args.data, args.data_root, "val", size=args.size)
    if args.max_train:
        train.files = train.files[: args.max_train]
    C = train.n_channels
    seg = ToySegmenter(C, args.width)
    opt = torch.optim.Adam(seg.parameters(), lr=args.lr)
    steps = args.epochs * ((len(train) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps)
    t0 = time.time()
    for epoch in range(args.epochs):
        seg.train()
        for x, y in batches(train, args.batch, True, gen):
            loss = F.cross_entropy(seg(x), y, ignore_index=0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss.item():.4f}  {time.time() - t0:.0f}s", flush=True)

    seg.eval()
    with torch.no_grad():  # scored exactly as evaluate.py scores generated images
        conf = sum(metrics.confusion(metrics.segment(seg, x, C), y, C) for x, y in batches(val, 64, False, gen))
    val_miou, _ = metrics.iou(conf, val.classes.eval_channels)
    print(f"val mIoU on real {args.data} images: {val_miou:.4f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, net in (("segmenter.pt", seg), ("features.pt", ToyFeatures(seg))):
        scripted = torch.jit.script(net)
        tmp = out / (name + ".tmp")
        scripted.save(str(tmp))
        tmp.replace(out / name)
    info = {"data": args.data, "n_channels": C, "val_miou_real": val_miou, "train_images": len(train),
            "epochs": args.epochs, "feature_dim": 2 * args.width, "seconds": round(time.time() - t0, 1)}
    (out / "evalnets.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {out / 'segmenter.pt'} and {out / 'features.pt'}")


if __name__ == "__main__":
    main()
