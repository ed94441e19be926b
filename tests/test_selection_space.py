"""Search spaces, search methods, the model-hopper scheduler and trial configs: pure, no Spark."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deepspark.config import ConfigError, load_config
from training.selection import space
from training.selection.config import SelectConfig, trial_config
from training.selection.schedule import HopScheduler


def dims(**entries):
    return space.parse_space({k.replace("__", "."): v for k, v in entries.items()})


def test_grid_enumerates_every_combination_in_order():
    points = space.grid(dims(optimizer__batch_size={"choice": [32, 64]}, model__name={"choice": ["a", "b", "c"]}))
    assert points == [{"optimizer.batch_size": b, "model.name": m} for b in (32, 64) for m in "abc"]


def test_random_is_seeded_and_respects_each_distribution():
    d = dims(optimizer__learning_rate={"loguniform": [1e-4, 1e-2]}, optimizer__warmup_epochs={"quniform": [0, 4, 1]},
             optimizer__batch_size={"choice": [16, 32]}, x__u={"uniform": [0.25, 0.5]})
    first, again, other = space.sample(d, 200, 3), space.sample(d, 200, 3), space.sample(d, 200, 4)
    assert first == again and first != other
    lrs = np.array([p["optimizer.learning_rate"] for p in first])
    assert lrs.min() >= 1e-4 and lrs.max() <= 1e-2
    # log-uniform: about half the draws below the geometric midpoint 1e-3 (uniform would put ~9 % there)
    assert 0.35 < np.mean(lrs < 1e-3) < 0.65
    assert {p["optimizer.warmup_epochs"] for p in first} == {0, 1, 2, 3, 4}
    assert all(isinstance(p["optimizer.warmup_epochs"], int) for p in first)
    assert {p["optimizer.batch_size"] for p in first} == {16, 32}
    assert all(0.25 <= p["x.u"] <= 0.5 for p in first)


@pytest.mark.parametrize("entry, words", [
    ({"optimizer.learning_rate": [0.1, 0.2]}, "search.space.optimizer.learning_rate: expected one of"),
    ({"optimizer.learning_rate": {"normal": [0, 1]}}, "search.space.optimizer.learning_rate: unknown distribution 'normal'"),
    ({"optimizer.learning_rate": {"loguniform": [0, 1]}}, "search.space.optimizer.learning_rate: loguniform needs low > 0"),
    ({"optimizer.learning_rate": {"uniform": [2, 1]}}, "search.space.optimizer.learning_rate: uniform needs low < high"),
    ({"optimizer.batch_size": {"quniform": [16, 64]}}, "search.space.optimizer.batch_size: quniform takes 3 numbers"),
    ({"optimizer.batch_size": {"choice": []}}, "search.space.optimizer.batch_size: choice takes a non-empty list"),
])
def test_malformed_space_names_the_key(entry, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(".", r"\.")):
        space.parse_space(entry)


def test_grid_refuses_continuous_dimensions_naming_the_key():
    with pytest.raises(ConfigError, match=r"search\.space\.optimizer\.learning_rate: grid search enumerates choices"):
        space.grid(dims(optimizer__learning_rate={"uniform": [0.1, 0.2]}))


def test_halving_rungs_and_survivors():
    assert space.rungs(1, 8, 2) == [1, 2, 4, 8]
    assert space.rungs(1, 6, 2) == [1, 2, 4, 6]
    assert space.rungs(2, 2, 3) == [2]
    scores = {0: 0.5, 1: 0.9, 2: 0.7, 3: 0.7, 4: 0.1}
    assert space.survivors(scores, 2) == [1, 2, 3]  # ceil(5 / 2) best; ties by index
    assert space.survivors(scores, 3) == [1, 2]
    assert space.survivors({7: 0.2}, 2) == [7]


def run_schedule(models: int, partitions: int, epochs: int, seed: int) -> HopScheduler:
    """Drive the scheduler like the driver does, with units finishing in a random order."""
    rng = np.random.default_rng(seed)
    sched = HopScheduler(partitions, {m: epochs for m in range(models)})
    idle, inflight, steps = set(range(partitions)), [], 0
    while not sched.done:
        for p in sorted(idle):
            unit = sched.next_for(p)
            if unit is not None:
                assert unit.model not in {u.model for u in inflight}  # never on two workers at once
                inflight.append(unit)
                idle.discard(p)
        assert inflight, "deadlock: nothing running and nothing schedulable"
        done = inflight.pop(int(rng.integers(len(inflight))))
        sched.finish(done)
        idle.add(done.partition)
        steps += 1
    assert steps == models * partitions * epochs
    return sched


@pytest.mark.parametrize("models, partitions, epochs", [(8, 2, 3), (3, 4, 2), (1, 2, 2), (5, 3, 1)])
def test_mop_visits_every_model_partition_pair_exactly_once_per_epoch(models, partitions, epochs):
    for seed in range(5):
        sched = run_schedule(models, partitions, epochs, seed)
        for m in range(models):
            history = sched.history[m]
            assert len(history) == partitions * epochs
            for e in range(epochs):
                assert sorted(history[e * partitions:(e + 1) * partitions]) == list(range(partitions))


def test_scheduler_resumes_from_history_and_marks_epoch_ends():
    sched = HopScheduler(2, {0: 2, 1: 2}, {0: [1], 1: [0, 1, 0]})
    unit = sched.next_for(0)
    assert (unit.model, unit.index, unit.epoch, unit.last_of_epoch) == (0, 1, 0, True)  # model 0 still needs 0
    assert sched.next_for(1) == sched.running[1]
    assert (sched.running[1].index, sched.running[1].epoch, sched.running[1].last_of_epoch) == (3, 1, True)
    with pytest.raises(ValueError, match="partition 0 is already training model 0"):
        sched.next_for(0)


def select(*overrides: str) -> SelectConfig:
    return load_config(SelectConfig, "select_models", list(overrides))


def test_trial_config_sets_searched_keys_and_keeps_the_rest():
    cfg = select("optimizer.warmup_epochs=0", "epochs=3", "seed=5")
    trial = trial_config(cfg, {"optimizer.learning_rate": 0.01, "model.name": "resnet_small"}, 2)
    assert trial.optimizer.learning_rate == 0.01 and trial.model.name == "resnet_small"
    assert trial.optimizer.warmup_epochs == 0 and trial.epochs == 3
    assert trial.seed == 7  # each configuration its own seed


def test_a_builders_parameters_are_searchable_keys():
    """model.params holds whatever the builder takes: any key under it is a searchable one,
    merged with the search's own model.params."""
    cfg = select("model.params={dense: 64}")
    trial = trial_config(cfg, {"model.params.filters": [16, 32], "model.params.dropout": 0.3}, 0)
    assert trial.model.params == {"dense": 64, "filters": [16, 32], "dropout": 0.3}
    assert cfg.model.params == {"dense": 64}  # the search's config is untouched


@pytest.mark.parametrize("params, words", [
    ({"optimizer.lr": 0.1}, "search.space.optimizer.lr: unknown key"),
    ({"model.paramz.filters": [8]}, "search.space.model.paramz.filters: unknown key"),
    ({"epochs": 3}, "search.space.epochs: only keys under model, optimizer, loader, horovod"),
    ({"optimizer.batch_size": -4}, "search.space.optimizer.batch_size: Input should be greater than 0"),
    ({"optimizer.schedule": "linear"}, "search.space.optimizer.schedule: Input should be 'cosine' or 'constant'"),
])
def test_trial_config_errors_name_the_search_key(params, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        trial_config(select(), params, 0)


def test_select_config_rejects_unknown_keys_naming_them():
    with pytest.raises(ConfigError, match=r"execution\.methd: unknown key"):
        select("execution.methd=mop")
    with pytest.raises(ConfigError, match=r"execution\.method: Input should be 'mop', 'task' or 'horovod'"):
        select("execution.method=ray")
    assert math.isclose(select().optimizer.learning_rate, 1e-3)


def test_progress_folds_units_into_epochs():
    from training.selection.job import Progress

    def unit(index, samples, loss, seconds, val=None):
        metrics = {"loss": loss, "accuracy": 1 - loss}
        if val is not None:
            metrics["val_accuracy"] = val
        return {"index": index, "samples": samples, "train_seconds": seconds, "seconds": seconds + 0.5,
                "metrics": metrics}

    progress = Progress(2, {0: [unit(0, 100, 0.9, 1.0), unit(1, 300, 0.5, 2.0, 0.7), unit(2, 100, 0.4, 1.0)]})
    (epoch,) = progress.epochs(0)  # the third unit starts an epoch that has not finished
    assert epoch["loss"] == pytest.approx((0.9 * 100 + 0.5 * 300) / 400)  # weighted by samples
    assert epoch["val_accuracy"] == 0.7  # the epoch's last unit evaluated
    assert epoch["samples_per_s"] == pytest.approx(400 / 3.0)
    assert epoch["epoch_seconds"] == pytest.approx(4.0)


def test_the_winner_is_the_best_finalist_never_a_stopped_configuration():
    from training.selection.job import choose_winner

    board = [{"trial": 0, "epochs": 1, "val_accuracy": 0.99, "val_loss": 0.1},  # stopped by halving
             {"trial": 1, "epochs": 4, "val_accuracy": 0.80, "val_loss": 0.5},
             {"trial": 2, "epochs": 4, "val_accuracy": 0.85, "val_loss": 0.6},
             {"trial": 3, "epochs": 4, "val_accuracy": 0.85, "val_loss": 0.4}]
    assert choose_winner(board, 4, "val_accuracy") == 2  # the tie goes to the lower index
    assert choose_winner(board, 4, "val_loss") == 3  # lower is better for a loss
    assert choose_winner(board, 1, "val_accuracy") == 0


def test_balanced_shards_deal_rows_evenly_and_deterministically():
    import itertools

    from training.data import balanced_shards

    def largest(rows: list[int], shards: list[int], n: int) -> int:
        return max(sum(r for r, s in zip(rows, shards) if s == k) for k in range(n))

    for rows in ([376, 376, 376, 100, 376, 376, 376, 20, 376, 376], [600, 360, 300, 240, 180]):
        shards = balanced_shards(rows, 2)
        assert len(shards) == len(rows) and set(shards) == {0, 1}
        # The most even deal there is (a partition waits on its largest share), found by brute force.
        best = min(largest(rows, list(deal), 2) for deal in itertools.product((0, 1), repeat=len(rows)))
        assert largest(rows, shards, 2) == best
        modulo = largest(rows, [i % 2 for i in range(len(rows))], 2)  # Petastorm's every other row group
        assert best < modulo
        assert balanced_shards(rows, 2) == shards
    by_size = sorted(range(5), key=lambda i: -[600, 360, 300, 240, 180][i])  # largest first, dealt in turn
    assert largest([600, 360, 300, 240, 180], [by_size.index(i) % 2 for i in range(5)], 2) > 840
    assert sorted(set(balanced_shards([5, 4, 3], 3))) == [0, 1, 2]
