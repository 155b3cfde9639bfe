#!/usr/bin/env bash
# Utility against ε on the toy default (issue 22): FedAvg, 3 seeds, ε ∈ {1, 4, 16, ∞}.
# Not run yet (too much CPU for the machine it was written on): about 12 runs × ~1 min each on
# 2 cores. Then: python scripts/plot_privacy_utility.py runs/privacy-utility
#
# Each ε is one `fedsim compare` of FedAvg over seeds 0,1,2 with central DP:
#   - clip C = 1: about FedAvg's mean step in the first rounds on the toy (0.77–0.98, seed 0 of
#     runs/compare-all); not tuned per ε.
#   - target ε at δ = 1e-5 after the run's 25 rounds: z is chosen before each run (printed,
#     and logged per round as `privacy.noise_multiplier` with `epsilon` in metrics.jsonl).
#   - ε = ∞ is the same clipping and fixed denominator with z = 0, so the curve isolates the
#     noise; plain FedAvg (runs/compare-all/fedavg) is the no-clip reference.
# The toy has 20 clients and cohorts of 10 (q = 0.5, fixed-size sampling, RDP under replace-
# one): client-level DP at this population needs large noise, which the figure shows.
set -euo pipefail
OUT=${OUT:-runs/privacy-utility}
SEEDS=${SEEDS:-0,1,2}
COMMON=(--set privacy.mechanism=central --set privacy.clip=1.0 --set privacy.delta=1e-5)
for eps in 1 4 16; do
  fedsim compare --algorithms fedavg --seeds "$SEEDS" "${COMMON[@]}" \
    --set "privacy.target_epsilon=$eps" --out "$OUT/eps-$eps"
done
fedsim compare --algorithms fedavg --seeds "$SEEDS" "${COMMON[@]}" \
  --set privacy.noise_multiplier=0 --out "$OUT/eps-inf"
python scripts/plot_privacy_utility.py "$OUT"
