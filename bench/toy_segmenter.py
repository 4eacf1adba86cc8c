"""Train the toy task's evaluation networks: a segmenter (for mIoU) and a feature net (for toy FID).

They play the part of the paper's DRN/UperNet evaluators and of Inception: trained on the *full* toy
target training set (never on the n-shot subset alone), used only to score generated images.
Both are saved as TorchScript files in the convention evaluate.py reads: input float images
(B,3,H,W) in [0,1]; the segmenter returns logits over the dataset's channels (channel 0 = dontcare),
the feature net returns (B, 64) pooled features. FID on these features is a toy-domain FID, not
comparable to Inception FID.

    python bench/toy_segmenter.py --out runs/toy/evalnets        # about a minute on a 2-core CPU

The long-tailed toy (BENCHMARKS.md, third version) trains them instead on a separate, class-balanced pool of
generated target images that never overlaps the task's own images (its n-shot subsets are drawn from the
training split; the validation split is scored):

    python bench/toy_segmenter.py --data folder --data-root data/toy_lt/target --size 64 \
        --pool 8000 --pool-seed 1 --epochs 10 --out runs/toy_lt/evalnets    # about 20 min of one core
"""
import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import metrics  # noqa: E402
import toy  # noqa: E402
from models import DataError  # noqa: E402


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


def pixel_hash(image):
    """sha1 of an image's pixels (H,W,3 uint8): equal for the same picture, whether generated or read from PNG."""
    return hashlib.sha1(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()


def lt_pool(count, seed, size=64):
    """The long-tailed toy's evaluator training pool: (labels (N,H,W) uint8 PNG values, images (N,H,W,3) uint8),
    item i = toy.toy_lt_item("target", "train", i, size, seed). The benchmark's task is generated with seed 0;
    another seed gives other random streams, and check_pool_disjoint verifies it on the pixels."""
    labels, images = np.zeros((count, size, size), np.uint8), np.zeros((count, size, size, 3), np.uint8)
    for i in range(count):
        labels[i], images[i] = toy.toy_lt_item("target", "train", i, size, seed)
    return labels, images


def check_pool_disjoint(images, dataset, root, seed):
    """Refuse a pool image whose pixels equal any training or validation image of the task folder `root`
    (the n-shot subsets come from its training split, the scores from its validation split)."""
    pool = {pixel_hash(im): i for i, im in enumerate(images)}
    for split in ("train", "val"):
        for img_path, _ in data.open_dataset(dataset, root, split).files:
            h = pixel_hash(np.asarray(Image.open(img_path).convert("RGB")))
            if h in pool:
                raise DataError(f"--pool-seed {seed}: pool item {pool[h]} has the same pixels as {img_path}; the "
                                f"evaluator must not train on the task's own images (choose another --pool-seed)")


def balanced_weights(labels, n_channels):
    """Per image: the largest 1 / (pool images showing the class) over the classes it shows, so that an image
    with a tail class is drawn about as often as one with head classes only."""
    shows = np.zeros((len(labels), n_channels), bool)
    for i, lab in enumerate(labels):
        shows[i, np.unique(lab)] = True
    count = shows.sum(0)
    inv = np.where(count > 0, 1.0 / np.maximum(count, 1), 0.0)
    return (shows * inv[None]).max(1)


def pool_batches(labels, images, weights, batch_size, gen):
    """One epoch of len(pool) images drawn with replacement by `weights`: (x in [0,1], channel ids)."""
    order = torch.multinomial(torch.as_tensor(weights, dtype=torch.float64), len(labels), True, generator=gen)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size].numpy()
        x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float().div(255)
        yield x, torch.from_numpy(labels[idx].astype(np.int64))


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
    p.add_argument("--pool", type=int, default=None,
                   help="long-tailed toy only: train on N target images generated with --pool-seed (sampled "
                        "class-balanced) instead of the folder's training split; the folder gives the validation "
                        "images and the classes")
    p.add_argument("--pool-seed", type=int, default=1,
                   help="generator seed of the pool (the task in data/toy_lt is seed 0; an overlap is refused)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train = data.open_dataset(args.data, args.data_root, "train", augment=True, size=args.size)
    val = data.open_dataset(args.data, args.data_root, "val", size=args.size)
    if args.max_train:
        train.files = train.files[: args.max_train]
    C = train.n_channels
    t0 = time.time()
    if args.pool:
        if list(val.classes.names) != toy.class_names("toy-lt-target"):
            raise DataError(f"--pool: {args.data_root or args.data} is not the long-tailed toy target (its classes.txt "
                            f"lists {len(val.classes.names)} classes starting '{val.classes.names[0]}')")
        if val[0]["image"].shape[-1] != (args.size or 64):
            raise DataError(f"--pool: the validation images are {val[0]['image'].shape[-1]} px, --size is {args.size}")
        count = min(args.pool, args.max_train or args.pool)
        pool_labels, pool_images = lt_pool(count, args.pool_seed, val[0]["image"].shape[-1])
        check_pool_disjoint(pool_images, val.dataset, val.root, args.pool_seed)
        weights = balanced_weights(pool_labels, C)
        print(f"pool: {count} images (seed {args.pool_seed}), generated and checked in {time.time() - t0:.0f}s", flush=True)
        n_train, epoch_batches = count, lambda: pool_batches(pool_labels, pool_images, weights, args.batch, gen)
    else:
        n_train, epoch_batches = len(train), lambda: batches(train, args.batch, True, gen)
    seg = ToySegmenter(C, args.width)
    opt = torch.optim.Adam(seg.parameters(), lr=args.lr)
    steps = args.epochs * ((n_train + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps)
    for epoch in range(args.epochs):
        seg.train()
        for x, y in epoch_batches():
            loss = F.cross_entropy(seg(x), y, ignore_index=0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss.item():.4f}  {time.time() - t0:.0f}s", flush=True)

    seg.eval()
    with torch.no_grad():  # scored exactly as evaluate.py scores generated images
        conf = sum(metrics.confusion(metrics.segment(seg, x, C), y, C) for x, y in batches(val, 64, False, gen))
    val_miou, per = metrics.iou(conf, val.classes.eval_channels)
    per_class = dict(zip(val.classes.names, per))
    print(f"val mIoU on real {args.data} images: {val_miou:.4f}")
    tail_miou = None
    if list(val.classes.names) == toy.class_names("toy-lt-target"):  # the long-tailed toy's tail: designed < 10%
        tail = [v for name, (_, p, _) in toy.TOY_LT_TARGET.items() if p < 0.10 for v in [per_class[name]] if v is not None]
        tail_miou = float(np.mean(tail)) if tail else None
        print(f"evaluator on real validation images: mIoU {val_miou:.3f}, tail mIoU "
              + ("n/a" if tail_miou is None else f"{tail_miou:.3f}"))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, net in (("segmenter.pt", seg), ("features.pt", ToyFeatures(seg))):
        scripted = torch.jit.script(net)
        tmp = out / (name + ".tmp")
        scripted.save(str(tmp))
        tmp.replace(out / name)
    info = {"data": args.data, "n_channels": C, "val_miou_real": val_miou, "val_tail_miou_real": tail_miou,
            "val_per_class_iou_real": per_class, "train_images": n_train,
            "pool_seed": args.pool_seed if args.pool else None, "class_balanced": bool(args.pool),
            "epochs": args.epochs, "width": args.width, "feature_dim": 2 * args.width,
            "seconds": round(time.time() - t0, 1)}
    (out / "evalnets.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {out / 'segmenter.pt'} and {out / 'features.pt'}")


if __name__ == "__main__":
    main()
