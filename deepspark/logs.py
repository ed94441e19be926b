"""Logging set-up shared by the jobs' entry points and the processes Spark starts for them (Horovod
ranks), so progress lines reach the console through `logging` rather than `print`."""

from __future__ import annotations

import logging

OUR_PACKAGES = ("deepspark", "pipelines", "training", "inference")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging() -> None:
    """Warnings from libraries, INFO from this project's packages; a no-op for the root handler
    when the process already has one (a user's own logging set-up wins)."""
    logging.basicConfig(level=logging.WARNING, format=FORMAT)
    for ours in OUR_PACKAGES:
        logging.getLogger(ours).setLevel(logging.INFO)
