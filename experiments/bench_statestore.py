"""Memory of many client states: fedsim's disk-backed store against a dict in memory.

Stores ``--states`` client states of ``--kib`` KiB each (one float32 tensor, as SCAFFOLD's c_i or a personal
adapter is a set of them), then reads every one back once, in a fresh process per variant, and prints each
process's peak RSS above its baseline (torch imported, nothing stored) and the store's seconds per put and get.

    python experiments/bench_statestore.py --states 10000 --kib 100 --cache-mb 64
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import torch

from fedsim.statestore import ClientStateStore


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def fill(variant: str, args: argparse.Namespace, results: multiprocessing.Queue) -> None:
    baseline = peak_rss_mib()
    numel = args.kib * 1024 // 4
    with tempfile.TemporaryDirectory() as tmp:
        states = (ClientStateStore(Path(tmp), args.states, int(args.cache_mb * 2**20)) if variant == "store"
                  else {})
        started = time.perf_counter()
        for client in range(args.states):
            state = {"control": torch.full((numel,), float(client))}
            if variant == "store":
                states.put(client, state)
            else:
                states[client] = state
        put_s = time.perf_counter() - started
        started = time.perf_counter()
        for client in range(args.states):
            if states.get(client)["control"][0].item() != client:
                raise RuntimeError(f"client {client}'s state came back wrong")
        get_s = time.perf_counter() - started
        results.put((variant, peak_rss_mib() - baseline, put_s / args.states, get_s / args.states))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--states", type=int, default=10_000)
    parser.add_argument("--kib", type=int, default=100, help="size of one client's state")
    parser.add_argument("--cache-mb", type=float, default=64, help="the store's runtime.state_cache_mb")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")  # a fresh process per variant: peaks do not mix
    results = context.Queue()
    print(f"{args.states} states of {args.kib} KiB ({args.states * args.kib / 1024:.0f} MiB in all)")
    for variant in ("dict", "store"):
        process = context.Process(target=fill, args=(variant, args, results))
        process.start()
        name, grown, put_s, get_s = results.get()
        process.join()
        print(f"{name:>5}: peak RSS +{grown:.0f} MiB; {put_s * 1e3:.2f} ms per put, {get_s * 1e3:.2f} ms per get")


if __name__ == "__main__":
    main()
