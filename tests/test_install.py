"""The GPU install path resolves against the pins: `scripts/setup.sh --gpu` installs the `gpu`
extra (TensorFlow 2.15.1 with its CUDA 12 wheels) instead of tensorflow-cpu; this asks pip what it
would install, from the index `make test`'s own set-up uses, without installing anything."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_extra_resolves_to_tensorflow_with_cuda_wheels_and_keeps_every_pin(tmp_path):
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "--dry-run",
                           "--ignore-installed", "--quiet", "--report", str(report), f"{PROJECT}[gpu]",
                           "horovod[spark]==0.28.1"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and any(s in done.stderr for s in ("NewConnectionError", "Could not fetch URL",
                                                               "Temporary failure in name resolution")):
        pytest.skip(f"the package index is out of reach: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    for pin in project["dependencies"] + ["horovod==0.28.1"]:
        name, _, version = pin.partition("==")
        name = name.split("[")[0].strip().lower()
        assert resolved.get(name) == version, (name, resolved.get(name))
    assert resolved.get("tensorflow") == "2.15.1" and "tensorflow-cpu" not in resolved
    assert {"nvidia-cudnn-cu12", "nvidia-cublas-cu12", "nvidia-nccl-cu12"} <= set(resolved), sorted(resolved)


def _gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", PROJECT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_check_passes_only_when_the_step_and_the_batch_ran_on_a_gpu():
    problems = _gpu_check().problems
    on_gpu = {"host": "w1", "assigned": "1", "tensorflow": "2.15.1", "cuda_build": True,
              "tensorflow_gpus": ["/physical_device:GPU:0", "/physical_device:GPU:1"],
              "weights_on": "/job:localhost/replica:0/task:0/device:GPU:1",
              "predicted_on": "/job:localhost/replica:0/task:0/device:GPU:1"}
    assert problems([on_gpu]) == []
    assert problems([{**on_gpu, "predicted_on": "/job:localhost/replica:0/task:0/device:CPU:0"}]) == [
        "w1 (Spark's GPU 1): predicted on /job:localhost/replica:0/task:0/device:CPU:0, not a GPU"]
    unassigned = problems([{**on_gpu, "assigned": None}])
    assert len(unassigned) == 1 and "Spark assigned no GPU" in unassigned[0]
    cpu_build = problems([{**on_gpu, "cuda_build": False, "tensorflow_gpus": []}])
    assert cpu_build == ["w1 (Spark's GPU 1): TensorFlow 2.15.1 sees no GPU; it is the CPU build "
                         "(run scripts/setup.sh --gpu)"]


def test_a_task_uses_the_gpu_spark_assigned_else_the_first():
    from inference.model import gpu_device

    names = ["/physical_device:GPU:0", "/physical_device:GPU:1"]
    assert gpu_device(names, "1") == "/GPU:1"
    assert gpu_device(names, None) == "/GPU:0"
    assert gpu_device([], "1") is None
