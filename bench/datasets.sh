#!/usr/bin/env bash
# The rows of results/datasets.md: on each dataset, the counted baselines (popularity,
# transitions, item-CF) and the neural configs as written, each trained once with seed 42 on
# 2 threads and evaluated on test once (needle train ends with that evaluation), then one
# table per dataset from `needle report`. Tuned rows come from `needle tune` (see the
# results file for their commands; they take a budget each).
# Usage: bench/datasets.sh [DATASET ...]   (default: ml-100k ml-1m; `synth` generates data/synth);
# MovieLens from NEEDLE_DATA_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
DATASETS=${*:-ml-100k ml-1m}
NEEDLE=target/release/needle
cargo build --release -q -p needle
for ds in $DATASETS; do
    runs=()
    configs="pop transitions itemcf youtubednn-recent sequential"
    if [ "$ds" = synth ]; then
        # The default synthetic log (the generator of results/scale.md at its default size).
        [ -f data/synth/schema.toml ] || "$NEEDLE" data synth --out data/synth --quiet
        configs="pop transitions itemcf youtubednn youtubednn-reg dssm-reg fm-reg mind-reg sequential"
    fi
    for cfg in $configs; do
        [ -f "configs/$ds/$cfg.toml" ] || continue
        out="runs/$ds-$cfg"
        [ -f "$out/metrics.json" ] || "$NEEDLE" --threads 2 train --config "configs/$ds/$cfg.toml" --out "$out" --quiet --force
        runs+=("$out")
    done
    echo; echo "### $ds"; echo
    "$NEEDLE" report "${runs[@]}"
done
