"""Aggregator updates per second with a Qwen2-VL-2B-sized LoRA adapter, against a target of 50/s.

The adapter is what fedsim's default LoRA config (r=8 on the language model's q/k/v/o projections) puts on
Qwen2-VL-2B's language model: 28 layers, hidden 1536, 12 query heads and 2 KV heads of dim 128, i.e. 224
tensors and 2,179,072 parameters. Seeded random client updates go through the aggregator's whole accept
path, as an engine drives it: the update guard (by default with a norm bound, so that the norm is computed),
the exact fixed-point accumulation, and the server step when a FedAvg round or a FedBuff buffer closes. Each
strategy runs with one torch thread (as in the Ray aggregator actor, which Ray pins to one) and with torch's
default thread count. Beside wall-clock updates/s it prints the process CPU time per update (all threads),
which shows how much of the wall time other jobs on a shared machine took; and the final adapter's digest,
so that two versions of the aggregator can be checked for bit-identical results.

    python experiments/bench_aggregator.py --updates 100 --repeats 3
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import torch

from fedsim.aggregator import Aggregator
from fedsim.algorithms import build_server_strategy
from fedsim.config import LoraConfig, ServerAlgoConfig
from fedsim.guard import UpdateGuard
from fedsim.messages import ClientUpdate, NamedTensors

TARGET = 50.0  # updates/s
LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 28, 1536, 8960, 12, 2, 128  # Qwen2-VL-2B's LM
VISION_DEPTH, VISION_DIM = 32, 1280  # its vision tower, which the default target regex leaves out


def linear_shapes() -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear layer in Qwen2-VL-2B's decoder and vision blocks, by module name."""
    shapes = {}
    for i in range(LAYERS):
        layer = f"model.language_model.layers.{i}"
        for proj, (fan_in, fan_out) in {
            "self_attn.q_proj": (HIDDEN, HEADS * HEAD_DIM), "self_attn.k_proj": (HIDDEN, KV_HEADS * HEAD_DIM),
            "self_attn.v_proj": (HIDDEN, KV_HEADS * HEAD_DIM), "self_attn.o_proj": (HEADS * HEAD_DIM, HIDDEN),
            "mlp.gate_proj": (HIDDEN, INTERMEDIATE), "mlp.up_proj": (HIDDEN, INTERMEDIATE),
            "mlp.down_proj": (INTERMEDIATE, HIDDEN),
        }.items():
            shapes[f"{layer}.{proj}"] = (fan_in, fan_out)
    for i in range(VISION_DEPTH):
        block = f"model.visual.blocks.{i}"
        shapes.update({
            f"{block}.attn.qkv": (VISION_DIM, 3 * VISION_DIM), f"{block}.attn.proj": (VISION_DIM, VISION_DIM),
            f"{block}.mlp.fc1": (VISION_DIM, 4 * VISION_DIM), f"{block}.mlp.fc2": (4 * VISION_DIM, VISION_DIM),
        })
    return shapes


def lora_adapter(lora: LoraConfig, seed: int) -> NamedTensors:
    """Random LoRA weights named as peft names them, on the modules ``lora.target_regex`` matches."""
    gen = torch.Generator().manual_seed(seed)
    adapter = {}
    for module, (fan_in, fan_out) in linear_shapes().items():
        if re.fullmatch(lora.target_regex, module):
            prefix = f"base_model.model.{module}"
            adapter[f"{prefix}.lora_A.default.weight"] = torch.randn(lora.r, fan_in, generator=gen) / fan_in ** 0.5
            adapter[f"{prefix}.lora_B.default.weight"] = torch.zeros(fan_out, lora.r)
    return adapter


def client_updates(adapter: NamedTensors, count: int, seed: int) -> list[ClientUpdate]:
    """``count`` updates with deltas of a few lr-1e-4 Adam steps' size and 20-400 samples each."""
    gen = torch.Generator().manual_seed(seed)
    return [ClientUpdate(client, {k: torch.randn(w.shape, generator=gen) * 1e-3 for k, w in adapter.items()},
                         num_samples=int(torch.randint(20, 400, (1,), generator=gen)))
            for client in range(count)]


def drive(server: ServerAlgoConfig, adapter: NamedTensors, updates: list[ClientUpdate], total: int,
          cohort: int, max_norm: float) -> tuple[float, float, str]:
    """Wall and CPU seconds to take ``total`` updates (cycling through ``updates``), and the final digest.

    Synchronous strategies close a round every ``cohort`` updates; asynchronous ones see staleness 0..3.
    """
    strategy = build_server_strategy(server, num_clients=len(updates))
    aggregator = Aggregator(strategy, UpdateGuard(max_norm))
    aggregator.init(adapter)
    started, cpu_started = time.perf_counter(), time.process_time()
    for i in range(total):
        update = updates[i % len(updates)]
        if strategy.asynchronous:
            update.base_version = max(0, aggregator.version - i % 4)
        if aggregator.submit(update) != "accepted":
            raise RuntimeError(f"update {i} was not accepted: {aggregator.stats()['rejected_by_reason']}")
        if not strategy.asynchronous and (i + 1) % cohort == 0:
            aggregator.close_round()
    if strategy.asynchronous:
        aggregator.flush()
    else:
        aggregator.close_round()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return seconds, cpu_seconds, aggregator.stats()["adapter_sha256"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=100, help="updates timed per run")
    parser.add_argument("--cohort", type=int, default=10, help="FedAvg round size and FedBuff buffer size")
    parser.add_argument("--distinct", type=int, default=10, help="distinct client updates, cycled through")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the median is reported")
    parser.add_argument("--max-norm", type=float, default=1e6,
                        help="the guard's bound (runtime.max_update_norm); the default is one no update reaches, "
                             "so that the norm is computed; 0: no bound (the config's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    adapter = lora_adapter(LoraConfig(), args.seed)
    updates = client_updates(adapter, args.distinct, args.seed + 1)
    servers = {"fedavg": ServerAlgoConfig(name="fedavg"),
               "fedbuff": ServerAlgoConfig(name="fedbuff", buffer_size=args.cohort, staleness_exponent=0.5)}
    params = sum(t.numel() for t in adapter.values())
    print(f"adapter: {len(adapter)} tensors, {params:,} parameters (LoRA r={LoraConfig().r}, Qwen2-VL-2B LM "
          f"q/k/v/o); {args.updates} updates per run, cohort {args.cohort}, guard max_norm {args.max_norm:g}, "
          f"median of {args.repeats} runs")
    print(f"{'strategy':<9} {'threads':>7} {'updates/s':>10} {'best/s':>8} {'vs 50/s':>8} {'cpu ms/update':>14}  "
          "adapter_sha256")
    for threads in (1, torch.get_num_threads()):
        torch.set_num_threads(threads)
        for name, server in servers.items():
            drive(server, adapter, updates, args.cohort, args.cohort, args.max_norm)  # warm-up
            runs = [drive(server, adapter, updates, args.updates, args.cohort, args.max_norm)
                    for _ in range(args.repeats)]
            rates = [args.updates / seconds for seconds, _, _ in runs]
            rate = statistics.median(rates)
            cpu_ms = statistics.median(cpu for _, cpu, _ in runs) * 1e3 / args.updates
            print(f"{name:<9} {threads:>7} {rate:>10.1f} {max(rates):>8.1f} {rate / TARGET:>7.2f}x {cpu_ms:>14.1f}  "
                  f"{runs[0][2][:16]}")


if __name__ == "__main__":
    main()
