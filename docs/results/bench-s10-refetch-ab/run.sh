#!/usr/bin/env bash
# Live on the widened model's O_DIRECT disk: PLEC at refetch_discount 1 (session 9) against 0.5 (the default), ABBA.
set -euo pipefail
cd /work/main
export OMP_NUM_THREADS=1
arm() {
  expertflow bench --widen 4096 --widen-dir results/widened --dataset alpaca --prompts 16 --max-new-tokens 16 \
    --memory-budget 10%,25% --batch-size 1,4,16 --systems all-in-memory,expertflow --store disk --threads 1 \
    --io-threads 1 --policy-setting refetch_discount=$1 --out results/s10/disk-ab/$2 --json > results/s10/disk-ab/$2.txt 2>&1
}
arm 1 r1-d1; arm 0.5 r1-d05; arm 0.5 r2-d05; arm 1 r2-d1
echo ab-done
