"""Search spaces and search methods, as pure functions (no Spark, no TensorFlow).

A space maps dotted training-config keys to a distribution, written in YAML as one-key mappings:

    optimizer.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}
    optimizer.batch_size: {choice: [32, 64, 128]}
    model.name: {choice: [convnet, resnet_small]}
    optimizer.warmup_epochs: {quniform: [0, 2, 1]}

`grid` enumerates every combination (choices only), `random` samples `num_models` points with a
seed, and `halving` samples like `random` and then keeps the best 1/eta at each rung
(successive halving, Jamieson & Talwalkar 2016; the synchronous form of ASHA).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from deepspark.config import ConfigError

KINDS = ("choice", "uniform", "loguniform", "quniform", "qloguniform")


@dataclass(frozen=True)
class Dimension:
    """One searched key and its distribution."""

    key: str
    kind: str
    args: tuple[Any, ...]

    def sample(self, rng: np.random.Generator) -> Any:
        if self.kind == "choice":
            return self.args[int(rng.integers(len(self.args)))]
        low, high = float(self.args[0]), float(self.args[1])
        if self.kind in ("loguniform", "qloguniform"):
            value = math.exp(rng.uniform(math.log(low), math.log(high)))
        else:
            value = rng.uniform(low, high)
        if self.kind.startswith("q"):
            q = float(self.args[2])
            value = round(value / q) * q
            return int(value) if all(float(a).is_integer() for a in self.args) else value
        return value


def parse_space(space: Mapping[str, Any], where: str = "search.space") -> list[Dimension]:
    """The YAML mapping as dimensions; a malformed entry raises naming its key."""
    dims = []
    for key, spec in space.items():
        name = f"{where}.{key}"
        if not isinstance(spec, Mapping) or len(spec) != 1:
            raise ConfigError(f"{name}: expected one of {{{', '.join(KINDS)}}}: [...], got {spec!r}")
        (kind, args), = spec.items()
        if kind not in KINDS:
            raise ConfigError(f"{name}: unknown distribution {kind!r} (known: {', '.join(KINDS)})")
        if not isinstance(args, Sequence) or isinstance(args, str) or not args:
            raise ConfigError(f"{name}: {kind} takes a non-empty list, got {args!r}")
        if kind != "choice":
            want = 3 if kind.startswith("q") else 2
            if len(args) != want or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise ConfigError(f"{name}: {kind} takes {want} numbers [low, high{', q' if want == 3 else ''}], got {args!r}")
            if args[0] >= args[1]:
                raise ConfigError(f"{name}: {kind} needs low < high, got {args!r}")
            if kind.endswith("loguniform") and args[0] <= 0:
                raise ConfigError(f"{name}: {kind} needs low > 0, got {args!r}")
            if want == 3 and args[2] <= 0:
                raise ConfigError(f"{name}: {kind} needs q > 0, got {args!r}")
        dims.append(Dimension(str(key), str(kind), tuple(args)))
    return dims


def grid(dims: Sequence[Dimension]) -> list[dict[str, Any]]:
    """Every combination of the choices, in the order the space lists them."""
    for dim in dims:
        if dim.kind != "choice":
            raise ConfigError(f"search.space.{dim.key}: grid search enumerates choices only, "
                              f"not {dim.kind} (use search.method=random or a choice list)")
    return [dict(zip([d.key for d in dims], values)) for values in itertools.product(*[d.args for d in dims])]


def sample(dims: Sequence[Dimension], count: int, seed: int) -> list[dict[str, Any]]:
    """`count` independent points; the same seed gives the same points."""
    rng = np.random.default_rng(seed)
    return [{d.key: d.sample(rng) for d in dims} for _ in range(count)]


def rungs(min_epochs: int, max_epochs: int, eta: int) -> list[int]:
    """The epochs after which successive halving decides: min, min x eta, ... up to max."""
    out = [min_epochs]
    while out[-1] * eta < max_epochs:
        out.append(out[-1] * eta)
    if out[-1] != max_epochs:
        out.append(max_epochs)
    return out


def survivors(scores: Mapping[int, float], eta: int, higher_is_better: bool = True) -> list[int]:
    """The best ceil(n / eta) trials of a rung (ties broken by trial index)."""
    keep = max(1, math.ceil(len(scores) / eta))
    ranked = sorted(scores, key=lambda t: ((-scores[t]) if higher_is_better else scores[t], t))
    return sorted(ranked[:keep])
