"""The guarantee table (tests/guarantees.yaml, run by `make mutants`) kept in step with the code,
the tests and the README: every removal still finds its code, every guard still exists, every
quoted promise is still in the README. Pure file checks, no Spark."""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent


def _mutants_module():
    spec = importlib.util.spec_from_file_location("mutants", PROJECT / "scripts" / "mutants.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mutants", module)  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


MUTANTS = _mutants_module()
TABLE = MUTANTS.load_table()


def _plain(text: str) -> str:
    return " ".join(text.replace("`", "").split())


@pytest.mark.parametrize("mutant", TABLE, ids=[m.id for m in TABLE])
def test_each_removal_finds_its_code_once_and_still_compiles(mutant):
    source = (PROJECT / mutant.file).read_text()
    assert source.count(mutant.find) == 1, f"{mutant.id}: `find` must occur exactly once in {mutant.file}"
    assert mutant.replace != mutant.find
    mutated = source.replace(mutant.find, mutant.replace, 1)
    if mutant.file.endswith(".toml"):
        tomllib.loads(mutated)
    else:
        compile(mutated, mutant.file, "exec")


@pytest.mark.parametrize("mutant", TABLE, ids=[m.id for m in TABLE])
def test_each_guard_exists(mutant):
    assert mutant.tests, f"{mutant.id}: no test guards it"
    for test in mutant.tests:
        path, _, name = test.partition("::")
        assert (PROJECT / path).is_file(), f"{mutant.id}: {path} does not exist"
        if name:
            assert re.search(rf"^def {re.escape(name)}\(", (PROJECT / path).read_text(), re.M), \
                f"{mutant.id}: {test} does not exist"


@pytest.mark.parametrize("mutant", TABLE, ids=[m.id for m in TABLE])
def test_each_guarantee_is_quoted_from_the_readme(mutant):
    readme = _plain((PROJECT / "README.md").read_text())
    position = 0
    for fragment in filter(None, (_plain(f) for f in mutant.readme.split("..."))):
        found = readme.find(fragment, position)
        assert found >= 0, f"{mutant.id}: {fragment!r} is not in README.md (after the previous fragment)"
        position = found + len(fragment)


def test_every_test_has_a_timeout(request):
    """tests/conftest.py gives each test its tier's limit (pytest-timeout): none can hang CI."""
    missing = [item.nodeid for item in request.session.items if item.get_closest_marker("timeout") is None]
    assert not missing
    assert request.node.get_closest_marker("timeout").args == (120,)  # a unit test's limit
