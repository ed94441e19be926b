"""Training engines: how a rank function is launched on the cluster and which collective its ranks
use. `engine` in the training config names one (errors name the key and list what is
registered); a package adds its own under the entry-point group `deepspark.engines` or by a
`module:attr` reference, with no change to jobs or models: an engine is an object with

    ranks(requested, slots) -> int                             (how many ranks; driver side)
    launch(task, num_proc, cfg) -> list of per-rank results  (raises RankFailure; driver side)
    collective() -> Collective                                 (inside a rank; training/trainer.py)

Built in: `horovod` (data-parallel ranks over gloo with horovod.spark, training/distributed.py) and
`single` (one Spark task trains alone: no Horovod, no gloo; for small models and debugging).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from deepspark.config import ConfigError
from deepspark.plugins import Registry

if TYPE_CHECKING:
    from training.config import TrainConfig
    from training.trainer import Collective

ENGINES = Registry("training engine", "deepspark.engines",
                   {"horovod": "training.engines:HOROVOD", "single": "training.engines:SINGLE"})


class Engine(Protocol):
    name: str

    def ranks(self, requested: int | None, slots: int) -> int: ...

    def launch(self, task: Callable[[], Any], num_proc: int, cfg: "TrainConfig") -> list[Any]: ...

    def collective(self) -> "Collective": ...


def resolve(name_or_ref: str, key: str = "engine") -> str:
    """The engine's `module:attr` reference, checked to load as an engine (before Spark starts work)."""
    ref = ENGINES.reference(name_or_ref, key)
    engine = ENGINES.load(ref, key)
    if not (callable(getattr(engine, "launch", None)) and callable(getattr(engine, "collective", None))):
        raise ConfigError(f"{key}: {name_or_ref!r} is not a training engine (it needs launch() and collective())")
    return ref


def load(ref: str) -> Engine:
    """The engine a reference from `resolve` names (on the driver or inside a rank)."""
    engine: Engine = ENGINES.load(ref, "engine")
    return engine


@dataclass(frozen=True)
class HorovodEngine:
    """Horovod ranks on Spark executors over gloo (`horovod.*` settings); elastic with
    `horovod.elastic`."""

    name: str = "horovod"
    elastic: bool = True  # runs `horovod.elastic=true` (an engine without this attribute refuses it)

    def ranks(self, requested: int | None, slots: int) -> int:
        return requested or slots

    def preflight(self, num_proc: int, cfg: "TrainConfig") -> "TrainConfig":
        """The config with Gloo's interfaces checked on the ranks' hosts (chosen when unset), so a
        bad `horovod.nics` fails before any run is opened."""
        from training.distributed import gloo_interfaces

        nics = gloo_interfaces(num_proc, cfg.horovod.nics)
        return cfg.model_copy(update={"horovod": cfg.horovod.model_copy(update={"nics": nics})})

    def launch(self, task: Callable[[], Any], num_proc: int, cfg: "TrainConfig") -> list[Any]:
        from training.config import horovod_environment
        from training.distributed import ElasticLimits, run_ranks

        settings = cfg.horovod
        elastic = ElasticLimits(settings.min_num_proc, settings.reset_limit) if settings.elastic else None
        return run_ranks(task, num_proc, settings.start_timeout_s, settings.nics, horovod_environment(settings),
                         elastic)

    def collective(self) -> "Collective":
        from training.distributed import HorovodCollective

        return HorovodCollective.start()


@dataclass(frozen=True)
class SingleTaskEngine:
    """One Spark task trains alone (num_proc must be 1): the same rank function without Horovod."""

    name: str = "single"

    def ranks(self, requested: int | None, slots: int) -> int:
        if requested not in (None, 1):
            raise ConfigError(f"horovod.num_proc={requested}: engine=single trains in one task")
        return 1

    def launch(self, task: Callable[[], Any], num_proc: int, cfg: "TrainConfig") -> list[Any]:
        from pyspark import SparkContext

        from training.distributed import RankFailure

        sc = SparkContext.getOrCreate()
        try:
            return sc.parallelize([0], 1).map(lambda _: task()).collect()
        except Exception as exc:
            raise RankFailure(f"the training task failed: {type(exc).__name__}: {str(exc)[-2000:]}") from exc

    def collective(self) -> "Collective":
        from training.trainer import Solo

        return Solo()


HOROVOD = HorovodEngine()
SINGLE = SingleTaskEngine()
