"""Model builders by reference (deepspark/builders.py) and the plug-in registries (deepspark/plugins.py):
resolution, the driver's checks against the dataset, and which code is the user's. Real Keras
models, no Spark."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepspark import builders
from deepspark.config import ConfigError
from deepspark.modality import ModalityRecord, TensorSpec, get_modality
from deepspark.plugins import Registry, load_reference

IMAGES = get_modality("image")
RECORD = ModalityRecord("image", TensorSpec("image", (28, 28, 1), "uint8"), {}, {}, tuple("abc"))
def test_names_resolve_to_the_modality_catalogue_and_references_pass_through():
    assert builders.reference(None, None, IMAGES) == ("pipelines.images.models:convnet", "model.name")
    assert builders.reference(None, "mlp", IMAGES) == ("pipelines.images.models:mlp", "model.name")
    assert builders.reference("acme.models:wide", None, IMAGES) == ("acme.models:wide", "model.builder")
    with pytest.raises(ConfigError, match="model.builder='x:y' and model.name='mlp': set one of them"):
        builders.reference("x:y", "mlp", IMAGES)
    with pytest.raises(ConfigError, match=r"model.name: unknown model builder 'vgg99' \(registered: convnet, "
                                          r"efficientnet_b0, mlp, mobilenet_v2, resnet50, resnet_small; or give a "
                                          r"'package.module:attribute' reference\)"):
        builders.reference(None, "vgg99", IMAGES)


def test_an_installed_package_registers_a_builder_by_entry_point(tmp_path, monkeypatch, user_package):
    """A distribution's entry point in the `deepspark.model_builders` group is a name like the
    built-ins (what `pip install` of a package declaring one leaves on the path)."""
    info = tmp_path / "site" / "acme_models-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-models\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[deepspark.model_builders]\nacme = acme_models:build\n")
    monkeypatch.syspath_prepend(str(info.parent))
    assert builders.reference(None, "acme", IMAGES) == ("acme_models:build", "model.name")
    assert "acme" in builders.registry(IMAGES).registered()
    model = builders.checked("acme_models:build", RECORD, {"width": 4}, "model.name")
    assert model.layers[-2].units == 4


@pytest.mark.parametrize("ref, params, message", [
    ("acme_models", {}, r"model.builder: 'acme_models' is not a 'package.module:attribute' reference"),
    ("acme_nothing:build", {}, r"model.builder: cannot import 'acme_nothing' for 'acme_nothing:build'"),
    ("acme_models:nope", {}, r"model.builder: 'acme_models' has no attribute 'nope'"),
    ("acme_models:NOT_A_FUNCTION", {}, r"model.builder: 'acme_models:NOT_A_FUNCTION' is not a function"),
    ("acme_models:build", {"depth": 3}, r"model.params: acme_models:build does not take \{'depth': 3\}"),
    ("acme_models:broken", {}, r"model.builder: acme_models:broken\(record, \*\*\{\}\) raised RuntimeError: "
                               r"the user's own bug"),
    ("acme_models:wrong_input", {}, r"model.builder: acme_models:wrong_input takes float32 \(32, 32, 3\), but the "
                                    r"dataset stores `image` as uint8 \(28, 28, 1\)"),
    ("acme_models:wrong_output", {}, r"model.builder: acme_models:wrong_output outputs 7 values, but the dataset has "
                                     r"3 labels \(a, b, c\)"),
])
def test_a_bad_builder_fails_on_the_driver_naming_the_key(user_package, ref, params, message):
    with pytest.raises(ConfigError, match=message):
        builders.checked(ref, RECORD, params, "model.builder")


def test_built_in_builders_take_parameters():
    default = builders.checked("pipelines.images.models:convnet", RECORD, {}, "model.name")
    narrow = builders.checked("pipelines.images.models:convnet", RECORD, {"filters": [8], "dense": 16}, "model.name")
    convs = [layer.filters for layer in narrow.layers if layer.__class__.__name__ == "Conv2D"]
    assert convs == [8] and [layer.filters for layer in default.layers if hasattr(layer, "filters")] == [32, 64]
    assert narrow.count_params() < default.count_params()


def test_only_the_users_own_code_is_shipped(user_package):
    assert builders.user_code("acme_models:build") == str(user_package.resolve())
    assert builders.user_code("pipelines.images.models:convnet") is None  # this project's
    assert builders.user_code("numpy:zeros") is None  # installed in the venv
    assert builders.user_code("json:loads") is None  # the standard library


def test_modalities_resolve_through_the_same_registry():
    assert get_modality("text").name == "text"
    assert get_modality("pipelines.audio.modality:AUDIO").name == "audio"  # a reference works too
    with pytest.raises(ConfigError, match=r"modality: unknown modality 'video' \(registered: audio, features, image, text"):
        get_modality("video")
    with pytest.raises(ConfigError, match="modality: 'numpy:zeros' is not a deepspark.modality.Modality"):
        get_modality("numpy:zeros")


def test_a_reference_names_an_attribute_path():
    assert load_reference("os.path:join", "k") is __import__("os").path.join
    assert load_reference("os:path.join", "k") is __import__("os").path.join
    assert Registry("thing", "deepspark.nothing_here", {"a": "os:sep"}).load("a", "k") == __import__("os").sep


def test_a_package_passed_as_a_zip_is_found_inside_it_and_packed_by_content(user_package, tmp_path, monkeypatch):
    """spark-submit --py-files acme.zip: the package imports from the zip; its code is unpacked to
    travel with the model, and packing is deterministic (same content, same name)."""
    import sys
    import zipfile

    archive = tmp_path / "acme.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(user_package / "__init__.py", "acme_models/__init__.py")
    monkeypatch.setattr(sys, "path", [str(archive), *[p for p in sys.path if p != str(user_package.parent)]])
    sys.modules.pop("acme_models", None)
    found = builders.user_code("acme_models:build")
    assert found is not None and found != str(user_package.resolve())
    assert Path(found, "__init__.py").read_text() == (user_package / "__init__.py").read_text()
    packed = builders.CodeArchive.pack(found)
    assert packed == builders.CodeArchive.pack(str(user_package)) and packed.name.startswith("acme_models-")
    with zipfile.ZipFile(__import__("io").BytesIO(packed.data)) as zf:
        assert zf.namelist() == ["acme_models/__init__.py"]
