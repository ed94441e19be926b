"""Typed, frozen job configs: defaults -> conf/base -> conf/<profile> -> key=value overrides.

Every value remembers where it came from, so a bad or unknown key is reported with
the file (or the command line) that set it, before any Spark work starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Mapping, Sequence, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR_ENV = "DEEPSPARK_CONF_DIR"
DEFAULTS_SOURCE = "built-in defaults"
CLI_SOURCE = "command line"
ALL_JOBS = "all.yaml"  # in a profile folder: settings for every Spark job (spark.*, tracking.*)

C = TypeVar("C", bound="FrozenModel")


class ConfigError(ValueError):
    """A config problem, always naming the key and where it was set."""


class FrozenModel(BaseModel):
    """Base for every config section: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `dotted.key=value` argument; the value is read as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key=value ({CLI_SOURCE})")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. a glob such as *.png): the literal string
    return key, value


def _merge(
    base: dict[str, Any],
    layer: Mapping[str, Any],
    sources: dict[str, str],
    source: str,
    prefix: str = "",
) -> None:
    """Deep-merge `layer` into `base`, recording the source of every leaf it sets."""
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value, sources, source, dotted + ".")
        else:
            base[key] = json.loads(json.dumps(value)) if isinstance(value, Mapping) else value
            sources[dotted] = source
            if isinstance(value, Mapping):
                for sub in _leaf_keys(value, dotted + "."):
                    sources[sub] = source


def _leaf_keys(tree: Mapping[str, Any], prefix: str) -> list[str]:
    keys: list[str] = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            keys.extend(_leaf_keys(value, f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _set(tree: dict[str, Any], dotted: str, value: Any, sources: dict[str, str], source: str) -> None:
    """A command-line override replaces the value at its key whole (a mapping is not merged)."""
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value
    for key in [k for k in sources if k.startswith(dotted + ".")]:
        del sources[key]
    sources[dotted] = source


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _source_of(dotted: str, sources: Mapping[str, str]) -> str:
    """The most specific recorded source for a key (or its nearest parent)."""
    probe = dotted
    while probe:
        if probe in sources:
            return sources[probe]
        probe = probe.rpartition(".")[0]
    return DEFAULTS_SOURCE


def _explain(exc: ValidationError, sources: Mapping[str, str]) -> ConfigError:
    lines = []
    for err in exc.errors():
        dotted = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        else:
            message = err["msg"]
            if "input" in err and not isinstance(err["input"], (dict, list)):
                message += f" (got {err['input']!r})"
        lines.append(f"{dotted}: {message} [set in {_source_of(dotted, sources)}]")
    return ConfigError("invalid config:\n  " + "\n  ".join(lines))


def default_conf_dir() -> Path:
    """$DEEPSPARK_CONF_DIR, else the checkout's conf/, else ./conf (code shipped as a zip, or a
    cluster-mode driver that received `--archives conf.zip#conf`)."""
    if os.environ.get(CONF_DIR_ENV):
        return Path(os.environ[CONF_DIR_ENV])
    checkout = PROJECT_ROOT / "conf"
    return checkout if checkout.is_dir() else Path.cwd() / "conf"


def java_charset(name: str) -> str:
    """A character set name as Spark's readers (Java) take it: Python's canonical name for it
    (`latin-1` -> `iso8859-1`, `utf8` -> `utf-8`), so a name Python knows works and an unknown one
    is a config error, not a failed task."""
    import codecs

    try:
        return codecs.lookup(name).name
    except LookupError:
        raise ValueError(f"unknown character set {name!r} (e.g. UTF-8, latin-1, cp1252, utf-16)") from None


# A config field naming a character set, checked and normalised by java_charset when the config loads.
Charset = Annotated[str, AfterValidator(java_charset)]


def load_config(
    model: type[C],
    job: str,
    overrides: Sequence[str] = (),
    profile: str | None = None,
    conf_dir: Path | None = None,
) -> C:
    """Resolve a job's config: model defaults, then conf/base/<job>.yaml, then for each profile
    (comma-separated) conf/<profile>/all.yaml and conf/<profile>/<job>.yaml, then `key=value`
    overrides; validate and freeze it."""
    conf_dir = conf_dir or default_conf_dir()
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    layers = [conf_dir / "base" / f"{job}.yaml"]
    for name in (profile.split(",") if profile else []):  # e.g. --profile standalone,gpu
        profile_dir = conf_dir / name.strip()
        if not profile_dir.is_dir():
            known = sorted(p.name for p in conf_dir.iterdir() if p.is_dir())
            raise ConfigError(f"profile {name!r}: no folder {profile_dir} (known profiles: {known})")
        layers += [profile_dir / ALL_JOBS, profile_dir / f"{job}.yaml"]
    for path in layers:
        if path.is_file():
            _merge(merged, _read_yaml(path), sources, str(path))
    for text in overrides:
        key, value = parse_override(text)
        _set(merged, key, value, sources, f"{CLI_SOURCE} ({text})")
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        raise _explain(exc, sources) from None


def config_to_yaml(config: BaseModel) -> str:
    """The resolved config as YAML, written next to every output and logged to MLflow."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten(config: BaseModel) -> dict[str, str]:
    """Dotted key -> string value, the shape MLflow params want."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = json.dumps(node) if isinstance(node, (list, dict)) else str(node)

    walk(config.model_dump(mode="json"), "")
    return out
