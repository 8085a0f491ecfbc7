"""Which clients take part in a round."""

from __future__ import annotations

from fedsim.seeding import rng_for


def sample_cohort(num_clients: int, cohort_size: int, seed: int, round_idx: int) -> list[int]:
    """``cohort_size`` distinct client ids drawn uniformly, seeded by (seed, round), in ascending order."""
    if not 0 < cohort_size <= num_clients:
        raise ValueError(f"cohort size {cohort_size} must be in 1..{num_clients} (the number of clients)")
    picked = rng_for(seed, "cohort", round_idx).choice(num_clients, size=cohort_size, replace=False)
    return sorted(int(c) for c in picked)
