"""Every random choice derives from the experiment seed and the names of where it is used.

Deriving (not drawing) seeds means a client's local training gets the same randomness whichever worker,
in whatever order, runs it: the precondition for engines that agree bit for bit.
"""

from __future__ import annotations

import numpy as np

STREAMS = {"data": 1, "partition": 2, "lora_init": 3, "cohort": 4, "client": 5,
           # fedsim.scheduler: device draws, availability, dropouts, async dispatch picks
           "device": 11, "availability": 12, "dropout": 13, "dispatch": 14, "async_dropout": 15,
           # fedsim.scenarios: which modalities each row / client keeps
           "scenario": 21, "test_scenario": 22,
           # fedsim.clientdata: per-client sizes, label mixes and row labels of data.samples_per_client
           "client_data": 23,
           # fedsim.evaluation: which test rows eval.max_samples keeps
           "eval_sample": 31,
           # fedsim.engine.loop: which clients' own adapters eval.personalized_clients scores
           "personalized_eval": 32,
           # study axes: who attacks and their noise (fedsim.attacks), DP noise on each client's update, on the
           # server's sum and on the clipped-update count (fedsim.uplink, fedsim.aggregator, fedsim.privacy),
           # random-k's positions (fedsim.compression)
           "attackers": 41, "attack": 42, "local_dp": 43, "central_dp": 44, "clip_count": 45, "compress": 46,
           "poison": 47}


def derive_seed(seed: int, stream: str, *parts: int) -> int:
    """A 63-bit seed for ``stream`` (a name in STREAMS) and integer coordinates such as (round, client)."""
    if not all(0 <= p < 2**32 for p in (seed, *parts)):
        raise ValueError(f"seed and coordinates must be in [0, 2**32): seed={seed}, coordinates={parts}")
    # The count of coordinates goes in too: SeedSequence would otherwise equate (1, 0) with (1,).
    entropy = [seed, STREAMS[stream], len(parts), *parts]
    words = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & (2**63 - 1)


def rng_for(seed: int, stream: str, *parts: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, stream, *parts))


def sample_without_replacement(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``k`` distinct integers of ``[0, n)``, uniformly, in O(k) time and memory whatever ``n`` (Floyd's
    algorithm; ``Generator.choice(n, k, replace=False)`` builds all of ``[0, n)`` when k > n/50 or n <= 10^4)."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot draw {k} distinct integers from [0, {n})")
    # The j-th of the last k values of [0, n): a draw t in [0, j], or j itself if t was drawn before.
    draws = rng.integers(0, np.arange(n - k, n, dtype=np.int64) + 1)
    chosen: set[int] = set()
    out = np.empty(k, dtype=np.int64)
    for i, (j, t) in enumerate(zip(range(n - k, n), draws.tolist())):
        pick = j if t in chosen else t
        chosen.add(pick)
        out[i] = pick
    return out
