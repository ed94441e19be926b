"""The layering, read off the source (every import statement, also those inside functions):
`deepspark/` is the ground floor and imports no stage; a stage (`pipelines/`, `training/`,
`inference/`) imports the core and itself, never another stage; `jobs/` and `scheduling/` are the
top. And no module-level import cycle anywhere. Plug-ins named by `module:attr` strings (the CLI's
jobs, the built-in modalities) are references, not imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
FLOORS = {"deepspark": 0, "pipelines": 1, "training": 1, "inference": 1, "jobs": 2, "scheduling": 2}


def modules() -> dict[str, Path]:
    found = {}
    for package in FLOORS:
        for path in sorted((PROJECT / package).rglob("*.py")):
            parts = path.relative_to(PROJECT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(imported module, line) of every import in the file; `top_level_only`: those that run when
    the module is imported (not inside functions, not under `if TYPE_CHECKING`)."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                inside = False
            if isinstance(child, ast.Import) and (inside or not top_level_only):
                found.extend((alias.name, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0 and \
                    (inside or not top_level_only):
                found.append((child.module, child.lineno))
                found.extend((f"{child.module}.{alias.name}", child.lineno) for alias in child.names)
            visit(child, inside)

    visit(tree, True)
    return found


def test_no_import_reaches_a_higher_floor_or_a_sibling_stage():
    wrong = []
    for name, path in modules().items():
        own = name.split(".")[0]
        for target, line in imports(path):
            other = target.split(".")[0]
            if other not in FLOORS or other == own:
                continue
            if FLOORS[other] > FLOORS[own] or (FLOORS[other] == FLOORS[own] == 1):
                wrong.append(f"{path.relative_to(PROJECT)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_module_level_import_cycle():
    known = modules()
    graph = {name: sorted({t for t, _ in imports(path, top_level_only=True) if t in known and t != name})
             for name, path in known.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if state.get(nxt) is None:
                found = cycle_from(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in graph:
        if start not in state:
            found = cycle_from(start, [start])
            assert found is None, " -> ".join(found)


@pytest.mark.parametrize("source, target", [
    ("deepspark/fake.py", "pipelines.etl"),  # the core importing a stage
    ("training/fake.py", "inference.job"),  # a stage importing a sibling
])
def test_the_check_sees_a_wrong_import(tmp_path, source, target):
    """The rule itself can fail: the same check on a file that breaks it."""
    fake = tmp_path / "fake.py"
    fake.write_text(f"def later():\n    from {target} import something\n")
    own, other = source.split("/")[0], target.split(".")[0]
    found = [t for t, _ in imports(fake)]
    assert target in found and (FLOORS[other] > FLOORS[own] or FLOORS[other] == FLOORS[own] == 1)


def test_models_registered_before_the_move_still_load(tmp_path):
    """Models registered before the registered-model class moved to deepspark.serving pickled it as
    `inference.serving.ModalityClassifier`: such a model (the same pickle with the old module name)
    still loads and predicts."""
    import io

    import mlflow
    import numpy as np
    from PIL import Image

    from deepspark import builders
    from deepspark.modality import ModalityRecord, TensorSpec
    from deepspark.serving import log_classifier
    from deepspark.tracking import TrackingSettings, ensure_experiment

    record = ModalityRecord("image", TensorSpec("image", (28, 28, 1), "uint8"),
                            {"height": 28, "width": 28, "channels": 1}, {}, ("a", "b"))
    previous = mlflow.get_tracking_uri()
    try:
        experiment = ensure_experiment(TrackingSettings(uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                                        artifact_root=str(tmp_path / "artifacts")))
        with mlflow.start_run(experiment_id=experiment):
            model = builders.build("pipelines.images.models:mlp", record, {"units": 4})
            info = log_classifier(model, record, None, str(tmp_path))
        local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model")))
    finally:
        mlflow.set_tracking_uri(previous)
    pickled = local / "python_model.pkl"
    data = pickled.read_bytes()
    assert b"deepspark.serving" in data and len(b"deepspark.serving") == len(b"inference.serving")
    pickled.write_bytes(data.replace(b"deepspark.serving", b"inference.serving"))  # as older models were
    png = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png, format="PNG")
    out = mlflow.pyfunc.load_model(str(local)).predict([png.getvalue()])
    assert list(out["predicted_label"]) in (["a"], ["b"])
