"""Plug-ins found by reference: a `package.module:attribute` string in config, or a name that is
built in or registered by an installed package as a Python entry point (group `deepspark.<kind>`,
e.g. in a user's pyproject.toml: `[project.entry-points."deepspark.model_builders"] wide = "acme.models:wide"`).

Modalities and model builders are found this way; an unknown name or a reference that does not
import fails before Spark starts, naming the config key and listing what is registered.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from deepspark.config import ConfigError


def load_reference(ref: str, key: str) -> Any:
    """The attribute a `package.module:attribute` reference names (errors name `key`)."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key}: {ref!r} is not a 'package.module:attribute' reference")
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import {module_name!r} for {ref!r} ({exc}); put its package on the "
                          "driver's path (spark-submit --py-files, or install it)") from None
    for part in attr.split("."):
        if not hasattr(found, part):
            raise ConfigError(f"{key}: {module_name!r} has no attribute {attr!r} (from {ref!r})")
        found = getattr(found, part)
    return found


def is_reference(value: str) -> bool:
    return ":" in value


@dataclass(frozen=True)
class Registry:
    """Names of one kind of plug-in: the built-in ones and those installed packages register as
    entry points in `group`; a `module:attr` reference needs no registration."""

    kind: str  # what a user calls it, for messages: "modality", "model builder"
    group: str  # the entry-point group, e.g. "deepspark.model_builders"
    builtin: Mapping[str, str] = field(default_factory=dict)  # name -> "module:attr"

    def registered(self) -> dict[str, str]:
        """Every registered name and its reference (built-ins win over an entry point's same name)."""
        from importlib.metadata import entry_points

        found = {ep.name: ep.value for ep in entry_points(group=self.group)}
        return {**found, **self.builtin}

    def reference(self, name_or_ref: str, key: str) -> str:
        """The `module:attr` reference of a name (or the reference itself); an unknown name fails
        naming `key` and listing the registered names."""
        if is_reference(name_or_ref):
            return name_or_ref
        if name_or_ref in self.builtin:  # no entry-point scan (milliseconds) for a built-in name:
            return self.builtin[name_or_ref]  # record.plugin is looked up per batch in inference
        names = self.registered()
        if name_or_ref not in names:
            raise ConfigError(f"{key}: unknown {self.kind} {name_or_ref!r} (registered: {', '.join(sorted(names))}; "
                              f"or give a 'package.module:attribute' reference)")
        return names[name_or_ref]

    def load(self, name_or_ref: str, key: str) -> Any:
        return load_reference(self.reference(name_or_ref, key), key)
