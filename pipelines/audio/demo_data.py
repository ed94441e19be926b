"""Spoken digits synthesised offline by Debian's `espeak-ng` as a raw audio folder:
`<out>/{train,test}/<digit word>/<voice>_s<speed>_p<pitch>.wav`, exactly the shape of a user's
recordings. The test split is spoken only by voices training never hears, so test accuracy
measures generalisation to new speakers rather than memorised ones."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

ESPEAK = "espeak-ng"
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# espeak-ng accents (gmw/*) with voice variants (!v/*); the mbrola voices need a separate package.
# Test voices use variants (m5, m7, f2) and two accents (West Midlands, New York) absent from train.
TRAIN_VOICES = ("en-us+m1", "en-us+f1", "en+m2", "en+f3", "en-gb-scotland+m3", "en-gb-x-rp+f4",
                "en-gb-x-gbclan+m4", "en-029+m6", "en-gb-x-rp+m8")
TEST_VOICES = ("en-gb-x-gbcwmd+m7", "en-us-nyc+f2", "en-gb-scotland+m5")
SPEEDS = (130, 160, 190)  # words per minute
PITCHES = (35, 50, 65)  # espeak-ng's 0-99 pitch scale
COMPLETE = "_COMPLETE"
SPEAK_TIMEOUT_S = 60


def espeak_available() -> bool:
    return shutil.which(ESPEAK) is not None


def voice_slug(voice: str) -> str:
    """A voice name safe in a file name and free of the `_` that separates name fields."""
    return re.sub(r"[^A-Za-z0-9]+", "-", voice).strip("-")


def clip_name(voice: str, speed: int, pitch: int) -> str:
    return f"{voice_slug(voice)}_s{speed}_p{pitch}.wav"


def _speak(word: str, voice: str, speed: int, pitch: int, path: Path) -> None:
    """One espeak-ng process writes one WAV; its stderr names a bad voice."""
    cmd = [ESPEAK, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), word]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=SPEAK_TIMEOUT_S)
    if done.returncode != 0 or not path.is_file() or path.stat().st_size <= 44:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}): {done.stderr.strip()}")


def _read_counts(marker: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split("=") for line in marker.read_text().split())}


def write_digits_folder(
    out: Path,
    train_voices: Sequence[str] = TRAIN_VOICES,
    test_voices: Sequence[str] = TEST_VOICES,
    speeds: Sequence[int] = SPEEDS,
    pitches: Sequence[int] = PITCHES,
    workers: int = 2,
    digits: Sequence[str] = DIGITS,
) -> dict[str, int]:
    """Write the WAV folder once; a rerun is a no-op, a half-written folder is never left in place.
    espeak-ng is single-threaded and quick (~20 ms a word), so a small thread pool of processes
    keeps ~1,000 clips well under a minute on two cores."""
    out = Path(out)
    marker = out / COMPLETE
    if marker.is_file():
        return _read_counts(marker)
    if not espeak_available():
        raise FileNotFoundError(f"{ESPEAK} not found on PATH; install Debian's espeak-ng (apt-get install espeak-ng)")
    train_slugs, test_slugs = [voice_slug(v) for v in train_voices], [voice_slug(v) for v in test_voices]
    if len(set(train_slugs)) < len(train_slugs) or len(set(test_slugs)) < len(test_slugs):
        raise ValueError(f"duplicate voices (after file-name sanitising): {train_slugs} / {test_slugs}")
    heard = set(train_slugs) & set(test_slugs)
    if heard:
        raise ValueError(f"test voices must be unheard in training; both splits have {sorted(heard)}")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    jobs: list[tuple[str, str, int, int, Path]] = []
    counts: dict[str, int] = {}
    for split, voices in (("train", train_voices), ("test", test_voices)):
        for word in digits:
            (tmp / split / word).mkdir(parents=True, exist_ok=True)
            jobs += [(word, v, s, p, tmp / split / word / clip_name(v, s, p))
                     for v in voices for s in speeds for p in pitches]
        counts[split] = len(digits) * len(voices) * len(speeds) * len(pitches)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(_speak, *job) for job in jobs]
        try:
            for future in futures:
                future.result()
        except BaseException:  # the first failure (e.g. an unknown voice) stops the run
            pool.shutdown(cancel_futures=True)
            raise
    (tmp / COMPLETE).write_text("".join(f"{k}={v}\n" for k, v in counts.items()))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return counts
