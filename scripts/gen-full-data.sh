#!/usr/bin/env bash
# Generates the full-scale data set (371,269 users, ~5M rows, 200,000 items) into data/full/.
# It is gitignored because it is ~230 MB, and deterministic, so anyone can rebuild the same bytes.
# Usage: scripts/gen-full-data.sh [--force]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

force=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h|--help)
            echo "usage: $0 [--force]  (regenerate data/full/ even if it exists)"
            exit 0
            ;;
        *)
            echo "unknown argument: $arg (usage: $0 [--force])" >&2
            exit 2
            ;;
    esac
done

if [[ $force -eq 0 && -s data/full/behavior.csv && -s data/full/item_features.csv ]]; then
    echo "data/full/behavior.csv and data/full/item_features.csv exist; use --force to regenerate"
    exit 0
fi

# Write into a scratch directory inside the gitignored data/full/ and move the files into place
# only on success, so an interrupted run never leaves a truncated file that the check above
# would mistake for a finished one.
partial=data/full/.partial
rm -rf "$partial"
cargo run --release -p streamrec-datagen -- --full --out-dir "$partial"
mv -f "$partial/behavior.csv" "$partial/item_features.csv" data/full/
rmdir "$partial"
