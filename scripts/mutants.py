"""The mutation check behind `make mutants`: for each guarantee in tests/guarantees.yaml, remove the
code that upholds it in a scratch copy of the project and run only the tests listed for it. A
guarantee is KILLED when one of them fails, SURVIVED when all pass (the tests do not guard it).

A development tool, not part of `make test`: each mutant runs its own (often Spark and Horovod)
tests, so the whole table takes a while. Usage:

    python scripts/mutants.py [--only ID[,ID...]] [--list] [--keep] [--baseline]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent
TABLE = PROJECT / "tests" / "guarantees.yaml"
log = logging.getLogger("mutants")


@dataclass(frozen=True)
class Mutant:
    """One guarantee: the README's words, where the code upholds it, its removal, its guards."""

    id: str
    readme: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]

    def apply(self, root: Path) -> None:
        """Replace the upholding code in the copy at `root`; the snippet must occur exactly once."""
        path = root / self.file
        text = path.read_text()
        found = text.count(self.find)
        if found != 1:
            raise ValueError(f"{self.id}: the code to remove occurs {found} times in {self.file} (expected once)")
        path.write_text(text.replace(self.find, self.replace, 1))
        if path.suffix == ".py":
            subprocess.run([sys.executable, "-m", "py_compile", str(path)], check=True)
        elif path.suffix == ".toml":
            tomllib.loads(path.read_text())


def load_table(path: Path = TABLE) -> list[Mutant]:
    entries = yaml.safe_load(path.read_text())
    mutants = []
    for entry in entries:
        missing = {"id", "readme", "file", "find", "replace", "tests"} - set(entry)
        if missing:
            raise ValueError(f"{path}: entry {entry.get('id', '?')} lacks {sorted(missing)}")
        mutants.append(Mutant(entry["id"], " ".join(entry["readme"].split()), entry["file"], entry["find"],
                              entry["replace"], tuple(entry["tests"])))
    ids = [m.id for m in mutants]
    if len(ids) != len(set(ids)):
        raise ValueError(f"{path}: duplicate ids {sorted({i for i in ids if ids.count(i) > 1})}")
    return mutants


def scratch_copy(into: Path) -> Path:
    """The project's tracked and untracked (not ignored) files, with the venv linked, not copied."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=PROJECT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    root = into / "project"
    for rel in filter(None, listed):
        source = PROJECT / rel
        if source.is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / rel)
    (root / ".venv").symlink_to(PROJECT / ".venv")
    return root


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    """pytest on `tests` in the copy, importing the copy's packages (not the editable install's),
    in Spark workers, Horovod ranks and spark-submit children too (PYTHONPATH is inherited)."""
    env = {**os.environ, "PYTHONPATH": str(root), "DEEPSPARK_CONF_DIR": str(root / "conf")}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    return done.returncode, (done.stdout + done.stderr)


def verdict(code: int) -> str:
    # pytest: 0 all passed, 1 some failed; 2-5 interrupted, internal or usage error, nothing collected
    return {0: "SURVIVED", 1: "KILLED"}.get(code, "ERROR")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated ids")
    parser.add_argument("--list", action="store_true", help="list the guarantees and exit")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies (printed)")
    parser.add_argument("--baseline", action="store_true", help="first run each mutant's tests unmutated")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    mutants = load_table()
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {m.id for m in mutants}
        if unknown:
            parser.error(f"--only: unknown ids {sorted(unknown)}")
        mutants = [m for m in mutants if m.id in wanted]
    if args.list:
        for m in mutants:
            log.info("%-40s %s  <- %s", m.id, m.file, ", ".join(m.tests))
        return 0
    results: list[tuple[str, str, float]] = []
    # One snapshot of the working tree, taken now: edits made while the check runs change nothing.
    pristine = scratch_copy(Path(tempfile.mkdtemp(prefix="mutants-base-")))
    for m in mutants:
        work = Path(tempfile.mkdtemp(prefix=f"mutant-{m.id}-"))
        try:
            root = work / "project"
            shutil.copytree(pristine, root, symlinks=True)
            if args.baseline:
                code, output = run_tests(root, m.tests)
                if code != 0:
                    log.info("BASELINE FAILED %s: its tests fail unmutated\n%s", m.id, output[-3000:])
                    results.append((m.id, "ERROR", 0.0))
                    continue
            m.apply(root)
            started = time.perf_counter()
            code, output = run_tests(root, m.tests)
            seconds = time.perf_counter() - started
            result = verdict(code)
            results.append((m.id, result, seconds))
            log.info("%-9s %-40s %6.0f s  %s", result, m.id, seconds, m.readme[:70])
            if result == "KILLED":  # which guard failed, and how: a kill for an unrelated reason shows here
                for line in [ln for ln in output.splitlines() if ln.startswith(("FAILED", "ERROR"))][:2]:
                    log.info("          %s", line[:160])
            else:
                log.info("%s", output[-3000:])
        finally:
            if args.keep:
                log.info("  scratch copy: %s", work)
            else:
                shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(pristine.parent, ignore_errors=True)
    killed = sum(r == "KILLED" for _, r, _ in results)
    log.info("\n%d of %d guarantees KILLED", killed, len(results))
    for mid, result, _ in results:
        if result != "KILLED":
            log.info("  %s %s", result, mid)
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
