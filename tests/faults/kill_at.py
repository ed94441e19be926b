"""Test-only driver: `spark-submit tests/faults/kill_at.py <step> <job> key=value...` runs the real
job and SIGKILLs its own driver process at one commit step (no finally, no cleanup, as a lost
node or an OOM killer would). Production code carries no fault hook; this wraps it from outside.

Steps of batch inference (inference.state.PredictionStore):
  between_tables   the predictions batch is written, the quarantine batch is not
  before_commit    both batches are written, no log entry lists them
  after_commit     the log entry is written, the old batches are not vacuumed yet
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(step: str) -> None:
    from inference import state

    store = state.PredictionStore
    if step == "between_tables":
        batch_url = store.batch_url

        def killing_batch_url(self, table, version, job_id):  # type: ignore[no-untyped-def]
            if table == "quarantine":
                die()
            return batch_url(self, table, version, job_id)

        store.batch_url = killing_batch_url  # type: ignore[method-assign]
    elif step == "before_commit":
        store.commit = lambda *a, **k: die()  # type: ignore[method-assign]
    elif step == "after_commit":
        commit = store.commit

        def commit_then_die(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            commit(self, *args, **kwargs)
            die()

        store.commit = commit_then_die  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown step {step!r}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    step, job = sys.argv[1], sys.argv[2]
    arm(step)
    script = Path(__file__).resolve().parents[2] / "jobs" / f"{job}.py"
    sys.argv = [str(script), *sys.argv[3:]]
    runpy.run_path(str(script), run_name="__main__")
