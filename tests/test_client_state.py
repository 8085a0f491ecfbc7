"""Client state (SCAFFOLD's c_i, personal adapters) is stored exactly when the aggregator accepts that
client's update: rejected, late and dropped updates leave it as it was.

The runs are driven round by round through the reference engine's own pieces, with a trainer whose chosen
tasks diverge (NaN in the update and in the new state, as a bf16 blow-up gives).
"""

import math

import pytest
import torch

from fedsim.client import split_state
from fedsim.engine.loop import FederationLoop
from fedsim.engine.sequential import SequentialParts, build_sequential
from fedsim.messages import ClientTask, NamedTensors
from fedsim.output import RunWriter, read_metrics

from conftest import small_config

pytestmark = pytest.mark.slow


class Diverging:
    """Wraps a ClientTrainer; the tasks ``diverges(task)`` picks come back with NaN everywhere (loss too)."""

    def __init__(self, trainer, diverges):
        self.trainer, self.loaded, self.diverges = trainer, trainer.loaded, diverges

    def train(self, task: ClientTask, weights, extras, state):
        update, new_state = self.trainer.train(task, weights, extras, state)
        if self.diverges(task):
            for tensor in [*update.delta.values(), *update.extras.values(), *(new_state or {}).values()]:
                tensor.fill_(math.nan)
            update.metrics["train_loss"] = math.nan
        return update, new_state


def rounds(cfg, tmp_path, diverges):
    """Yield the engine's parts after each synchronous round of ``cfg``."""
    parts: SequentialParts = build_sequential(cfg)
    parts.executor.open_client_states(tmp_path / "states", None)
    parts.executor.trainer = Diverging(parts.executor.trainer, diverges)
    loop = FederationLoop(cfg, RunWriter(tmp_path / "run"), parts.executor, parts.aggregator, parts.shard_sizes,
                          parts.adapter_bytes, parts.strategy.personalized, parts.strategy.asynchronous)
    loop.initial_handle = loop.publish()
    for _ in loop.run_sync(cfg.federation.rounds):
        yield parts, loop


def stored_states(parts: SequentialParts) -> dict[int, NamedTensors]:
    states = parts.executor.states
    return {client: states.get(client) for client in states.clients().tolist()}


def test_scaffold_server_control_stays_the_mean_of_the_stored_client_controls(tmp_path):
    # Measured compute times with overcommit: each round one of the three trained clients is late; every
    # task of round 2 diverges, and a third of the others, so rounds mix accepted, rejected and late updates.
    cfg = small_config(tmp_path, "algorithm.server.name=scaffold", "algorithm.client.name=scaffold",
                       "training.optimizer=sgd", "training.lr=0.05", "scheduler.compute_time=measured",
                       "scheduler.overcommit=1.5", "federation.clients_per_round=2", "federation.rounds=4",
                       "eval.zero_shot=false", "eval.every=4")
    n = cfg.partition.num_clients
    def diverges(task: ClientTask) -> bool:
        return task.seed_round == 2 or (task.seed_round + task.client_id) % 3 == 0

    for parts, loop in rounds(cfg, tmp_path, diverges):
        control = parts.aggregator.snapshot()[1][1]
        stored = stored_states(parts)
        assert all(torch.isfinite(t).all() for state in stored.values() for t in state.values())
        for key, c in control.items():
            name = key[len("control/"):]
            mean = sum((stored[i][name] for i in stored), torch.zeros_like(c)) / n  # never accepted: c_i = 0
            assert torch.allclose(c, mean, rtol=1e-4, atol=1e-7), key
    stats = parts.aggregator.stats()
    assert stats["rejected_by_reason"]["non_finite"] >= 2 and stats["accepted_updates"] >= 1
    assert loop.tally.late == 4  # trained, then dropped
    assert max(c.abs().max().item() for c in control.values()) > 0


def test_a_rejected_personal_adapter_is_neither_kept_nor_evaluated(tmp_path):
    cfg = small_config(tmp_path, "algorithm.server.name=local_only", "eval.zero_shot=false")
    for parts, loop in rounds(cfg, tmp_path, lambda task: task.client_id % 2 == 0):
        pass
    records = read_metrics(tmp_path / "run")
    for record in records:  # a round's train_loss averages its accepted (odd) clients only
        assert math.isfinite(record["train_loss"]) == any(client % 2 for client in record["clients"])
    trained = {client for record in records for client in record["clients"]}
    stored = stored_states(parts)
    # Even clients' adapters all diverged and were rejected: only odd clients keep one.
    assert set(stored) == {client for client in trained if client % 2 == 1} != set()
    adapters = [split_state(state)[0] for state in stored.values()]
    assert all(torch.isfinite(t).all() for adapter in adapters for t in adapter.values())
    assert loop.metrics and all(math.isfinite(v) for v in loop.metrics.values())
