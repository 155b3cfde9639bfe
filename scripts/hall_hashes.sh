#!/usr/bin/env bash
# The four final projectors' tensor digests that pin the engine's behaviour across a refactor
# (issue 19):
#   (a) the default run (toy-iid, FedAvg), (b) Fed-CMP on toy-dirichlet, (c) SCAFFOLD cut back to
#   its round-10 checkpoint as a crash leaves it and resumed, (d) a centralized run (Ray Train).
# The benchmark suite is off (eval.benchmarks=[]): it reads the projector, never writes it.
# The digest is fedsim.runio.weights_digest, the SHA-256 of the tensors (names, dtypes, shapes,
# bytes): the file's own SHA-256 is not a bit-identity test, because safetensors writes its
# metadata map in a different order in every process (equal tensors, different headers).
#
#   bash scripts/hall_hashes.sh [WORKDIR]     # prints "name digest" lines; about 6 min on 2 cores
#
# Run it before and after a change to the engine: the four lines must be equal. (c) also checks
# that the resumed run ends on the uninterrupted run's bits.
set -euo pipefail
work=${1:-$(mktemp -d)}
mkdir -p "$work"
fedsim="${FEDSIM:-fedsim}"
python="${PYTHON:-$(dirname "$(command -v "$fedsim")")/python}"
digest() {
  "$python" -c 'import sys; from fedsim.runio import load_weights, weights_digest; print(weights_digest(load_weights(sys.argv[1])))' "$1"
}
common=(--no-progress -s "eval.benchmarks=[]")

"$fedsim" run "${common[@]}" -o "$work/a-default" >/dev/null
"$fedsim" run "${common[@]}" -c toy-dirichlet -s algorithm.name=fedcmp -o "$work/b-fedcmp" >/dev/null
"$fedsim" run "${common[@]}" -s algorithm.name=scaffold -s checkpoint_every=5 \
  -s checkpoint_keep=10 -o "$work/c-full" >/dev/null
"$fedsim" run "${common[@]}" -s algorithm.name=centralized -o "$work/d-centralized" >/dev/null

# (c): a copy of the finished SCAFFOLD run as a crash after round 10's checkpoint leaves it.
rm -rf "$work/c-scaffold-resumed"
cp -r "$work/c-full" "$work/c-scaffold-resumed"
cut="$work/c-scaffold-resumed"
rm -rf "$cut/final" "$cut/eval" "$cut/summary.md" "$cut/eval.json" "$cut/resources.json" "$cut/curves.png"
for d in "$cut"/checkpoints/round-*; do
  r=$((10#${d##*round-}))
  if ((r > 10)); then rm -rf "$d"; fi
done
printf '{"round": 11, "loss": 0.1' >>"$cut/metrics.jsonl"
"$fedsim" run --no-progress --resume "$cut" >/dev/null

full=$(digest "$work/c-full/final/projector.safetensors")
resumed=$(digest "$cut/final/projector.safetensors")
if [[ "$full" != "$resumed" ]]; then
  echo "SCAFFOLD: resumed $resumed != uninterrupted $full" >&2
  exit 1
fi
for name in a-default b-fedcmp c-scaffold-resumed d-centralized; do
  echo "$name $(digest "$work/$name/final/projector.safetensors")"
done
