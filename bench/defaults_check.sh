#!/usr/bin/env bash
# README step 5 + 6 on my_data (toy source of step 1), seeds 0 1 2, two settings A and B; one line per run, then
# report mean +- std of FID-toy and mIoU for both, whatever they show. Which comparison: the first argument.
#   stage2 (default; design fixed before any result, 2026-12-06): A = the new defaults (stage 2 = SPADE modules,
#          lr_D 4e-4), B = the old ones pinned (--g-train blocks --lr-d 1.6e-3); both with the EMA warm-up they
#          were measured with (--ema-warmup, a default until later that day).
#   ema    (design fixed before any result): A = official OASIS's EMA (the default, no warm-up), B = --ema-warmup.
# Run from the repository root after README steps 1, 3 and 4 (runs/toy_quick, my_data, runs/aff).
set -e
mode=${1:-stage2}
case $mode in
  stage2) common="--ema-warmup"; b_extra="--g-train blocks --lr-d 1.6e-3" ;;
  ema) common=""; b_extra="--ema-warmup" ;;
  *) echo "usage: bash bench/defaults_check.sh [stage2|ema]" >&2; exit 2 ;;
esac
mkdir -p runs/cmp_$mode
for seed in 0 1 2; do
  for cfg in A B; do
    extra="$common"; [ $cfg = B ] && extra="$common $b_extra"
    out=runs/cmp_$mode/$cfg$seed
    python finetune_oasis.py --source toy-source --source-ckpt runs/toy_quick/source/checkpoint.pt \
       --affinity runs/aff/affinity.npy --data folder --data-root my_data --size 64 --n 100 \
       --stage1-steps 60 --stage2-steps 90 --eval-every 50 --lr 4e-4 --ema-decay 0.99 \
       --fid-features runs/toy_quick/evalnets/features.pt --seed $seed $extra --overwrite --out $out > $out.log 2>&1
    python evaluate.py --ckpt $out/best.pt --data folder --data-root my_data --size 64 --split val \
       --fid-features runs/toy_quick/evalnets/features.pt --segmenter runs/toy_quick/evalnets/segmenter.pt \
       --out $out/eval > $out.eval.log 2>&1
    echo "$cfg $seed $(grep -E '^(fid|miou) ' $out.eval.log | tr '\n' ' ')"
  done
done
