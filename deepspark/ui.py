"""`make ui`: the MLflow UI over the project's store, opened on the experiment's training runs.

MLflow 3.17's UI keeps a "workflow type" (GenAI or machine learning) in the browser and starts a new
browser in GenAI mode, where an experiment opens on its traces overview whatever the experiment's
`mlflow.experimentKind` tag says. The page's own query parameter `workflowType=machine_learning`
selects model-training mode, and the `runs` tab is the runs table: that URL is what `make ui` and the
demos' summaries print.

Usage: python -m deepspark.ui [--host 127.0.0.1] [--port 5000] [--print-url]
"""

from __future__ import annotations

import argparse
import os
import sys

from deepspark.tracking import DEFAULT_ARTIFACTS, TrackingSettings, ensure_experiment, tracking_uri


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's training runs in MLflow's model-training mode, from the server's base URL."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")  # loopback: the store holds every run's params
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--print-url", action="store_true", help="print the runs page's URL and exit")
    args = parser.parse_args(argv)
    settings = TrackingSettings()
    url = runs_url(f"http://{args.host}:{args.port}", ensure_experiment(settings))
    print(f"MLflow UI: open {url}")  # noqa: T201 - the one line a user copies into a browser
    if args.print_url:
        return
    sys.stdout.flush()
    artifacts = os.path.abspath(DEFAULT_ARTIFACTS)
    os.execv(os.path.join(os.path.dirname(sys.executable), "mlflow"),
             ["mlflow", "ui", "--backend-store-uri", tracking_uri(settings), "--default-artifact-root", artifacts,
              "--host", args.host, "--port", str(args.port)])


if __name__ == "__main__":
    main()
