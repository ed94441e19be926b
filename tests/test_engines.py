"""Training engines by name or reference (training/engines.py): the seam a second engine plugs
into. Pure resolution, no Spark; tests/test_training.py trains with `engine=single` for real."""

from __future__ import annotations

import pytest

from deepspark.config import ConfigError
from training import engines


def test_engines_resolve_by_name_or_reference_and_unknown_names_list_the_registered():
    assert engines.resolve("horovod") == "training.engines:HOROVOD"
    assert engines.resolve("training.engines:SINGLE") == "training.engines:SINGLE"
    with pytest.raises(ConfigError, match=r"engine: unknown training engine 'mirrored' \(registered: horovod, single"):
        engines.resolve("mirrored")
    with pytest.raises(ConfigError, match=r"engine: 'os:sep' is not a training engine"):
        engines.resolve("os:sep")


def test_each_engine_decides_its_ranks():
    assert engines.load("training.engines:HOROVOD").ranks(None, 2) == 2
    assert engines.load("training.engines:HOROVOD").ranks(3, 2) == 3  # checked against the slots by the plan
    assert engines.load("training.engines:SINGLE").ranks(None, 2) == 1
    with pytest.raises(ConfigError, match=r"horovod.num_proc=2: engine=single trains in one task"):
        engines.load("training.engines:SINGLE").ranks(2, 2)
