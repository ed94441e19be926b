"""A modality that is not one of the project's, named by reference: the ETL (real local[2] Spark)
turns a folder into a dataset through it with no change elsewhere, and the dataset opens with it."""

from __future__ import annotations

import numpy as np
import pytest

from deepspark.config import ConfigError, load_config
from pipelines.config import EtlConfig

pytestmark = pytest.mark.spark
REFERENCE = "tests.plugin_modality:HEAD"


def test_an_unknown_modality_fails_listing_the_registered_ones():
    with pytest.raises(ConfigError, match=r"modality: unknown modality 'video' \(registered: audio, features, image, text"):
        load_config(EtlConfig, "etl", ["modality=video"])


def test_a_plugin_modality_by_reference_runs_the_etl(spark, tmp_path):
    from deepspark.datasets import open_dataset
    from pipelines.etl import run_etl

    raw = tmp_path / "raw"
    rng = np.random.default_rng(0)
    files = {}
    for label in ("x", "y"):
        (raw / label).mkdir(parents=True)
        for i in range(6):
            data = rng.integers(0, 256, 3 + i, dtype=np.uint8).tobytes()
            (raw / label / f"{i}.bin").write_bytes(data)
            files[f"{label}/{i}.bin"] = data
    (raw / "x" / "empty.bin").write_bytes(b"")
    result = run_etl(spark, load_config(EtlConfig, "etl", [
        f"modality={REFERENCE}", "modality_rules={length: 5}", f"input.path={raw}", f"output.root={tmp_path / 'out'}",
        "output.name=heads", "tracking.enabled=false", "input.split_fractions={train: 0.5, test: 0.5}"]))
    assert (result.inputs_in, result.rows_written, result.quarantined) == (13, 12, 1)
    assert result.manifest["totals"]["quarantine_by_reason"] == {"empty_file": 1}
    dataset = open_dataset(spark, str(tmp_path / "out"), "heads")
    assert dataset.record.modality == REFERENCE and dataset.record.spec.shape == (5,)
    assert type(dataset.record.plugin).__name__ == "HeadModality"
    from petastorm import make_reader

    stored = {}
    for split in dataset.manifest["splits"]:
        with make_reader(dataset.split_url(split), reader_pool_type="dummy", num_epochs=1) as reader:
            for row in reader:
                stored[row.path.split("/raw/", 1)[1]] = dataset.record.plugin.decode([row.head], dataset.spec)[0]
    assert stored.keys() == files.keys()
    for rel, data in files.items():
        want = np.zeros(5, np.uint8)
        want[: min(5, len(data))] = np.frombuffer(data[:5], np.uint8)
        assert np.array_equal(stored[rel], want), rel
