#!/usr/bin/env bash
# The real-size check: every fedsim path at LLaVA-1.5-7B widths on the skeleton backbone
# (tests marked real_size: FedAvg and Fed-CMP at rank 256 — its default route and the sketch
# with the block SRHT and bf16 products — for two rounds each with cohort batching, a
# checkpoint and a resume to the uninterrupted bits, export and reload by
# transformers, peak memory per worker, the hf evaluation backend). 145 s on 2 cores (latest)
# and ~3 GB per worker, so it is not part of `make test`; run it after changing the engine,
# the backbone loader or an algorithm's server half.
#
#   bash scripts/real_size_check.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
make setup >/dev/null
exec .venv/bin/python -m pytest -m real_size -v "$@"
