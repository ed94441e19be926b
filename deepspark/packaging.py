"""Build what spark-submit ships to executors: one zip of the project's Python packages for
`--py-files`, and a zip of `conf/` for drivers that run on the cluster (`--archives`)."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("deepspark", "pipelines", "training", "inference")


def build_pyfiles(dest_dir: Path) -> Path:
    """dest_dir/deepspark.zip with the packages' .py files (no caches, no tests)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / "deepspark.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for package in PACKAGES:
            for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
                zf.write(path, path.relative_to(PROJECT_ROOT).as_posix())
    return target


def build_conf(dest_dir: Path) -> Path:
    """dest_dir/conf.zip: unpacked as ./conf next to a cluster-mode driver (`--archives conf.zip#conf`)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / "conf.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted((PROJECT_ROOT / "conf").rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(PROJECT_ROOT / "conf").as_posix())
    return target


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "dist")
    print(build_pyfiles(out), build_conf(out))
