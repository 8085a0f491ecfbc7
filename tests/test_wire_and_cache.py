"""Messages that pickle as one buffer per dtype, and the worker's cache of encoded training samples."""

from __future__ import annotations

import numpy as np
import ray.cloudpickle as cloudpickle
import torch

from fedsim.data.encoded import EncodedSamples
from fedsim.messages import nbytes
from fedsim.messages import WireTensors


def test_wire_tensors_come_back_bit_for_bit_from_one_buffer_per_dtype():
    tensors = {"a": torch.randn(8, 32), "b": torch.randn(32, 8).t(), "half": torch.randn(3, 4).to(torch.bfloat16),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 5), "c": torch.arange(6).view(2, 3)}
    buffers, layout, order = WireTensors(tensors).__reduce__()[1]
    assert len(buffers) == 3  # float32, bfloat16, int64: not one storage per tensor
    back = cloudpickle.loads(cloudpickle.dumps(WireTensors(tensors)))
    assert isinstance(back, WireTensors) and list(back) == list(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor)
    assert cloudpickle.loads(cloudpickle.dumps(WireTensors())) == {}


def test_encoded_samples_are_encoded_once_per_client_and_row_within_the_budget():
    encoded_calls = []

    def samples(client: int, rows: np.ndarray) -> list[dict]:
        return [{"client": client, "row": int(r)} for r in rows]

    def encode(sample: dict) -> dict:
        encoded_calls.append((sample["client"], sample["row"]))
        return {"input_ids": torch.full((10,), sample["row"], dtype=torch.int64)}  # 80 bytes

    cache = EncodedSamples(samples, encode, budget_bytes=3 * 80)
    first = cache.get(0, np.array([1, 2]))
    assert [int(e["input_ids"][0]) for e in first] == [1, 2]
    cache.get(0, np.array([2, 1]))
    assert encoded_calls == [(0, 1), (0, 2)]  # the second call read both from the cache
    cache.get(1, np.array([1]))  # another client's row 1 is its own sample (a poisoned one, say)
    assert encoded_calls[-1] == (1, 1) and cache.cache.bytes == 3 * 80
    cache.get(0, np.array([3]))  # over the budget: the least recently used, client 0's row 2, goes
    assert sorted(cache.cache) == [(0, 1), (0, 3), (1, 1)] and cache.cache.bytes <= 3 * 80
    assert nbytes(first[0]) == 80
    never = EncodedSamples(samples, encode, budget_bytes=0)
    never.get(0, np.array([1]))
    never.get(0, np.array([1]))
    assert encoded_calls[-2:] == [(0, 1), (0, 1)] and not never.cache
