"""Real faults against batch inference: SIGKILL a real spark-submit job at each commit step, race
two real jobs for one output. Afterwards every input is scored exactly once, and a reader polling
the output the whole time only ever saw the old complete output or the new one."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from deepspark.config import load_config
from inference.config import BatchInferenceConfig

pytestmark = [pytest.mark.spark, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parent.parent
OLD, NEW = (400, 3), (403, 4)  # (predictions, quarantine) before and after the new files


def command(script: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    from deepspark.localcluster import submit_command

    return submit_command("local[1]", script, args)


def infer(spark, registry, folder: Path, out: Path, *extra: str):
    from inference.job import run_inference

    return run_inference(spark, load_config(BatchInferenceConfig, "batch_inference", [
        *registry, f"input.path={folder}", f"output.path={out}", *extra]))


def visible(spark, out: Path) -> tuple[int, int]:
    from inference.state import read_tables

    pred, quar, _ = read_tables(spark, str(out))  # both as of one commit
    for frame in (pred, quar):  # nothing doubled, whatever the moment
        assert frame.count() == frame.select("path", "content_hash").distinct().count()
    return pred.count(), quar.count()


class Reader(threading.Thread):
    """Reads the output through `read_table` in a loop, recording what it saw."""

    def __init__(self, spark, out: Path) -> None:
        super().__init__(daemon=True)
        self.spark, self.out, self.seen, self.errors = spark, out, set(), []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.seen.add(visible(self.spark, self.out))
            except Exception as exc:  # any failure to read is a gap
                self.errors.append(repr(exc))
            self.stop.wait(0.2)


def add_new_inputs(folder: Path) -> None:
    coat = sorted((folder / "Coat").iterdir())
    for i in range(3):
        (folder / "Coat" / f"new-{i}.png").write_bytes(coat[i].read_bytes())  # a new path: a new input
    (folder / "Bag" / "new-broken.png").write_bytes(coat[0].read_bytes()[:50])


@pytest.mark.parametrize("step,refresh", [("between_tables", False), ("before_commit", False),
                                          ("after_commit", False), ("before_commit", True), ("after_commit", True)])
def test_sigkill_at_a_commit_step_then_rerun_scores_everything_exactly_once(spark, registry, raw_copy, tmp_path,
                                                                           step, refresh):
    out = tmp_path / "predictions"
    infer(spark, registry, raw_copy, out)
    assert visible(spark, out) == OLD
    add_new_inputs(raw_copy)
    reader = Reader(spark, out)
    reader.start()
    args = [*registry, f"input.path={raw_copy}", f"output.path={out}", *(["full_refresh=true"] if refresh else [])]
    cmd, env = command(PROJECT / "tests" / "faults" / "kill_at.py", step, "batch_inference", *args)
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0 and "hashed" not in killed.stdout, killed.stderr[-3000:]  # died before its summary
    committed = step == "after_commit"
    assert visible(spark, out) == (NEW if committed else OLD)
    assert (out / "_LOCK").exists()  # the killed job never released its lock ...
    rerun = infer(spark, registry, raw_copy, out)  # ... which the rerun takes over (its holder is dead)
    reader.stop.set()
    reader.join()
    assert rerun.scored + rerun.quarantined == (0 if committed else 4)
    assert visible(spark, out) == NEW
    assert reader.errors == [] and reader.seen <= {OLD, NEW} and OLD in reader.seen
    # On disk: only batches a commit lists (the killed run's uncommitted ones were vacuumed).
    logged = set()
    for entry in sorted((out / "_log").iterdir()):
        batches = json.loads(entry.read_text())["batches"]
        logged |= {name for table in batches.values() for names in table.values() for name in names}
    on_disk = {p.name.split("=", 1)[1] for p in [*out.glob("model_version=*/batch=*"),
                                                  *Path(f"{out}_quarantine").glob("model_version=*/batch=*")]}
    assert on_disk == logged


def test_two_inference_processes_race_and_every_input_is_scored_once(registry, raw_copy, tmp_path, spark):
    out = tmp_path / "predictions"
    args = [*registry, f"input.path={raw_copy}", f"output.path={out}"]
    cmd, env = command(PROJECT / "jobs" / "batch_inference.py", *args)
    procs = [subprocess.Popen(cmd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [(p.wait(timeout=600), p.stdout.read() + p.stderr.read()) for p in procs]
    winners = [o for code, o in outcomes if code == 0 and "scored now 400 + quarantined 3" in o]
    assert len(winners) == 1, [o[-3000:] for _, o in outcomes]
    loser_code, loser = next((code, o) for code, o in outcomes if o is not winners[0])
    # The loser either met the winner's lock (and names it) or ran after it and found nothing new.
    assert (loser_code != 0 and "is locked by job" in loser) or (loser_code == 0 and "nothing new" in loser), \
        loser[-3000:]
    assert visible(spark, out) == OLD
