"""The closing summary of `make demo`: what was produced, where, and how to look at it."""

from __future__ import annotations

import json
from pathlib import Path

DATASETS = Path("data/datasets")


def main() -> None:
    print("\n=== DeepSpark demo: what was produced ===")
    for dataset in sorted(p for p in DATASETS.glob("*") if p.is_dir()):
        pointer = dataset / "_LATEST"
        if not pointer.is_file():
            continue
        version = pointer.read_text().strip()
        manifest = json.loads((dataset / f"v={version}" / "manifest.json").read_text())
        totals = manifest["totals"]
        print(f"dataset {manifest['dataset']} v={version} (id {manifest['dataset_id']})")
        print(f"  where:    {dataset / f'v={version}'}  (data/<split>/ = Petastorm Parquet, quarantine/, manifest.json)")
        print(f"  rows:     {totals['rows_written']} written, {totals['quarantined']} quarantined of {totals['files_in']} files")
        print("  splits:   " + ", ".join(f"{s}={sum(c.values())}" for s, c in manifest["counts"].items()))
    print("MLflow:     make ui, then open http://127.0.0.1:5000 (experiment 'deepspark')")


if __name__ == "__main__":
    main()
