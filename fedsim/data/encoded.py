"""Training samples kept as the collator encoded them, so that a client's next task skips the encoding.

Encoding a sample (chat template, tokenizer, image processor) costs about a third of its forward and
backward pass on the tiny preset, and a client's rows are encoded again in each of its tasks otherwise. A
sample is keyed by (client, row): an attacking client's rows are its own poisoned versions, and a client's
samples must not change between its tasks (every shipped dataset adapter derives them from the seed; a
plugin's adapter must too, or run with ``runtime.sample_cache_mb=0``). The cache is bounded in bytes and
drops the least recently used samples first.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from fedsim.lru import BytesLRU

Encoded = dict[str, torch.Tensor]


class EncodedSamples:
    """``get(client, rows)``: the encoded samples of a client's rows, from the cache or encoded now.

    ``samples(client, rows)`` gives the rows as the client trains on them, ``encode`` encodes one; the
    cached tensors are shared by every batch built from them, so whatever builds a batch must copy them
    (the collator's padding does)."""

    def __init__(self, samples: Callable[[int, np.ndarray], list[dict]], encode: Callable[[dict], Encoded],
                 budget_bytes: int) -> None:
        self.samples, self.encode = samples, encode
        self.cache = BytesLRU(budget_bytes)

    def get(self, client: int, rows: np.ndarray) -> list[Encoded]:
        keys = [(client, int(row)) for row in rows]
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        fresh = dict(zip(missing, map(self.encode, self.samples(client, rows[missing])))) if missing else {}
        out = []
        for i, key in enumerate(keys):
            encoded = fresh.get(i)
            if encoded is None:
                encoded = self.cache.lookup(key)
            else:
                self.cache.keep(key, encoded)
            out.append(encoded)
        return out
