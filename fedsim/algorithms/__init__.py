"""Federated algorithms: server strategies (aggregation rules) and client strategies (local-loss terms).

Each kind has one registry keyed by the name a YAML config uses (``algorithm.server.name``,
``algorithm.client.name``). Asynchronous server strategies (``fedbuff``, ``fedasync``) share the server
registry and say so with ``ServerStrategy.asynchronous``.
"""

from __future__ import annotations

from typing import Sequence

from fedsim.algorithms.asynchronous import AsyncServerStrategy
from fedsim.algorithms.robust import RobustStrategy
from fedsim.algorithms.client import CLIENT_STRATEGIES, ClientStrategy, LocalContext
from fedsim.algorithms.server import SERVER_STRATEGIES, ServerStrategy
from fedsim.config import ClientAlgoConfig, ServerAlgoConfig

__all__ = [
    "CLIENT_STRATEGIES", "SERVER_STRATEGIES", "ClientStrategy", "ServerStrategy", "AsyncServerStrategy", "RobustStrategy",
    "LocalContext", "build_client_strategy", "build_server_strategy",
]


def _unknown(key: str, value: str, registry: dict) -> ValueError:
    return ValueError(f"config key '{key}' has invalid value {value!r}: expected one of "
                      + ", ".join(sorted(registry)))


def build_client_strategy(cfg: ClientAlgoConfig) -> ClientStrategy:
    """The client strategy named by ``cfg.name``."""
    if cfg.name not in CLIENT_STRATEGIES:
        raise _unknown("algorithm.client.name", cfg.name, CLIENT_STRATEGIES)
    return CLIENT_STRATEGIES[cfg.name](cfg)


def build_server_strategy(cfg: ServerAlgoConfig, num_clients: int,
                          client_sizes: Sequence[int] | None = None) -> ServerStrategy:
    """The server strategy named by ``cfg.name``, for a federation of ``num_clients`` clients whose sample
    counts are ``client_sizes`` (needed only by strategies that weigh the whole population, such as
    SCAFFOLD's control variate under sample weighting)."""
    if cfg.name not in SERVER_STRATEGIES:
        raise _unknown("algorithm.server.name", cfg.name, SERVER_STRATEGIES)
    return SERVER_STRATEGIES[cfg.name](cfg, num_clients, client_sizes)
