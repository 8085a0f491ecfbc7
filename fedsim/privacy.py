"""Client-level differential privacy: DP-FedAvg (McMahan et al., ICLR 2018) with adaptive clipping
(Andrew et al., NeurIPS 2021), and its accounting by Google's ``dp-accounting``.

The order of operations in one aggregation step, which the guarantee depends on:

  1. clip each client's update to L2 norm S over the whole adapter (``clip_update``), so that one client
     can move the sum by at most S whatever it sends;
  2. sum the clipped updates exactly (the aggregator's fixed-point sum: the order of arrival changes no bit);
  3. add Gaussian noise N(0, sigma^2 S^2) once, to the sum (``gaussian_noise`` with std = sigma * S);
  4. divide by a FIXED denominator (the expected cohort size K), never by the number that arrived: a
     data-dependent denominator would change the sensitivity and leak who took part.

Each such step is the subsampled Gaussian mechanism with noise multiplier sigma; ``PrivacyAccountant``
composes them and reports epsilon at the configured delta. ``AdaptiveClip`` moves S toward a quantile of
the update norms from a noised count, and ``adaptive_noise_multiplier`` gives the update's noise
multiplier that keeps the total cost (update + count) that of sigma alone.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedsim.config import fail
from fedsim.messages import NamedTensors
from fedsim.seeding import derive_seed

if TYPE_CHECKING:  # dp_accounting (with scipy) loads where a run accounts for privacy only
    import dp_accounting

# The RDP accountant warns (through absl's logger) for every order whose series does not converge and is left
# out of the minimum over orders, dozens of lines a call; epsilon is still the library's.
logging.getLogger("absl").setLevel(logging.ERROR)

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed")


def _is_count(x: Any) -> bool:
    """An integer (Python's or numpy's), not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# --- clipping and noise -----------------------------------------------------------------------------------


def update_norm(delta: NamedTensors) -> float:
    """L2 norm of the whole adapter update (all tensors as one vector), in float64.

    The bound S applies to the client's whole contribution, so the norm is taken over every tensor
    together; float64 keeps the sum of squares of many float32 entries from losing the last digits.
    """
    total = sum(float(t.detach().to(torch.float64).square().sum()) for t in delta.values())
    return math.sqrt(total)


def clip_update(delta: NamedTensors, clip_norm: float) -> tuple[NamedTensors, float]:
    """(delta * min(1, clip_norm / norm), norm) as new float32 tensors; the input is left untouched.

    An update within the bound is copied bit for bit (clipping must not perturb honest small updates);
    one above it is scaled down to norm ``clip_norm`` (DP-FedAvg, McMahan et al. 2018). A zero update stays
    zero. A non-finite update is refused: no scaling bounds it, and one NaN would poison the noised sum.
    """
    if not clip_norm > 0 or not math.isfinite(clip_norm):
        raise ValueError(f"clip_norm must be a finite value > 0, got {clip_norm!r}")
    norm = update_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("cannot clip an update with non-finite values (inf or NaN)")
    if norm <= clip_norm:
        return {k: t.detach().to(torch.float32, copy=True) for k, t in delta.items()}, norm
    scale = clip_norm / norm
    # Scaled in float64 and rounded once, so the clipped norm is clip_norm to float32 precision.
    return {k: (t.detach().to(torch.float64) * scale).to(torch.float32) for k, t in delta.items()}, norm


def gaussian_noise(like: NamedTensors, std: float, seed: int) -> NamedTensors:
    """Independent N(0, std^2) float32 entries with the names and shapes of ``like`` (its values unused).

    One torch.Generator seeded with ``seed`` draws the tensors in sorted name order, so the same seed and
    names give the same bits on any worker, in whatever order the dict holds them (a checkpoint's tensors
    come back in another order than the model's).
    """
    if not std >= 0 or not math.isfinite(std):
        raise ValueError(f"noise std must be a finite value >= 0, got {std!r}")
    if std == 0:
        return {k: torch.zeros(t.shape, dtype=torch.float32) for k, t in like.items()}
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    drawn = {k: torch.randn(like[k].shape, generator=gen, dtype=torch.float32) * std for k in sorted(like)}
    return {k: drawn[k] for k in like}


def adaptive_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """The noise multiplier of the update when the clip count is released too (Andrew et al. 2021).

    The count of unclipped updates has sensitivity 1/2 once centred (b_i - 1/2), so with noise std
    sigma_b it is a Gaussian mechanism of multiplier 2*sigma_b. Two Gaussian releases compose like one of
    multiplier (sigma_delta^-2 + (2 sigma_b)^-2)^-1/2; asking that this be ``noise_multiplier`` gives
    sigma_delta = (sigma^-2 - (2 sigma_b)^-2)^-1/2, which exists only when 2 sigma_b > sigma.
    """
    if not noise_multiplier > 0:
        fail("privacy.noise_multiplier", noise_multiplier, "a value > 0")
    if not 2 * count_noise_std > noise_multiplier:
        fail("privacy.count_noise_std", count_noise_std,
             f"a value > privacy.noise_multiplier / 2 ({noise_multiplier / 2}): adaptive clipping spends part "
             "of the budget on the count, and a count noise this small would leave nothing for the update")
    return (noise_multiplier ** -2 - (2 * count_noise_std) ** -2) ** -0.5


# --- accounting -------------------------------------------------------------------------------------------


class PrivacyAccountant:
    """Epsilon of client-level DP after each aggregation step, from dp_accounting.

    Only the parameters and the count of steps are kept: epsilon is recomputed by composing the step's
    event ``steps`` times in a fresh library accountant (cached per count), so an accountant rebuilt from
    its state reports exactly the same epsilon as the original, whatever the pattern of ``step`` calls.
    """

    def __init__(self, noise_multiplier: float, sample_size: int, population: int, delta: float,
                 accountant: str = "rdp", sampling: str = "poisson") -> None:
        if not noise_multiplier > 0 or not math.isfinite(noise_multiplier):
            fail("privacy.noise_multiplier", noise_multiplier, "a finite value > 0")
        if not 0 < delta < 1:
            fail("privacy.delta", delta, "a value in (0, 1)")
        if not (_is_count(population) and population >= 1):
            fail("partition.num_clients", population, "an integer >= 1")
        if not (_is_count(sample_size) and 1 <= sample_size <= population):
            fail("federation.clients_per_round", sample_size, f"an integer in [1, {population}] (the population)")
        if accountant not in ACCOUNTANTS:
            fail("privacy.accountant", accountant, "one of " + ", ".join(ACCOUNTANTS))
        if sampling not in SAMPLINGS:
            fail("privacy.sampling", sampling, "one of " + ", ".join(SAMPLINGS))
        if accountant == "pld" and sampling == "fixed":
            fail("privacy.accountant", accountant,
                 "'rdp' with privacy.sampling 'fixed': dp_accounting's PLD accountant has no event for sampling "
                 "without replacement (use privacy.sampling 'poisson' with 'pld')")
        self.noise_multiplier = float(noise_multiplier)
        self.sample_size = int(sample_size)
        self.population = int(population)
        self.delta = float(delta)
        self.accountant = accountant
        self.sampling = sampling
        self._steps = 0
        self._cache: dict[int, float] = {0: 0.0}

    def event(self) -> dp_accounting.DpEvent:
        """The DpEvent of one aggregation step."""
        import dp_accounting

        if self.sampling == "poisson":
            # Poisson sampling with q = K/N: the analysis of McMahan et al. 2018, and the standard
            # approximation for fixed-size cohorts (TensorFlow Federated, Flower). q = 1: full participation.
            q = self.sample_size / self.population
            return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(self.noise_multiplier))
        # Fixed-size sampling without replacement (Wang, Balle, Kasiviswanathan 2019) is analysed under the
        # replace-one relation (the cohort size is public). Replacing one client's clipped update moves the
        # sum by up to 2S, not S, and GaussianDpEvent takes std / sensitivity: sigma*S / 2S = sigma / 2.
        return dp_accounting.SampledWithoutReplacementDpEvent(
            self.population, self.sample_size, dp_accounting.GaussianDpEvent(self.noise_multiplier / 2))

    def _library_accountant(self) -> dp_accounting.PrivacyAccountant:
        import dp_accounting

        if self.accountant == "pld":
            return dp_accounting.pld.PLDAccountant()
        relation = (dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE if self.sampling == "poisson"
                    else dp_accounting.NeighboringRelation.REPLACE_ONE)
        return dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)

    def step(self, count: int = 1) -> None:
        """Compose ``count`` more aggregation steps."""
        if not (_is_count(count) and count >= 0):
            raise ValueError(f"step count must be an integer >= 0, got {count!r}")
        self._steps += int(count)

    @property
    def steps(self) -> int:
        return self._steps

    def epsilon(self) -> float:
        """Epsilon at ``delta`` after the steps so far (0.0 after none)."""
        if self._steps not in self._cache:
            library = self._library_accountant().compose(self.event(), self._steps)
            self._cache[self._steps] = float(library.get_epsilon(self.delta))
        return self._cache[self._steps]

    def state(self) -> dict[str, Any]:
        """JSON-serializable parameters and step count: all ``from_state`` needs."""
        return {"noise_multiplier": self.noise_multiplier, "sample_size": self.sample_size,
                "population": self.population, "delta": self.delta, "accountant": self.accountant,
                "sampling": self.sampling, "steps": self._steps}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PrivacyAccountant:
        """The accountant ``state()`` describes; comparing its parameters with a config is the caller's job."""
        params = {k: state[k] for k in ("noise_multiplier", "sample_size", "population", "delta",
                                         "accountant", "sampling")}
        accountant = cls(**params)
        accountant.step(state["steps"])
        return accountant


# --- adaptive clipping ------------------------------------------------------------------------------------


class AdaptiveClip:
    """The clip norm that follows a target quantile of update norms, privately (Andrew et al. 2021):
    each update reports b_i = 1[norm_i <= C]; at the end of a step the server takes
    b_bar = (sum b_i + N(0, count_noise_std^2)) / expected_count and sets
    C <- C * exp(-lr * (b_bar - target_quantile)).

    The geometric update is the paper's: it moves C by a factor, so it reaches norms of any scale in a
    number of steps logarithmic in their ratio to the start, and C stays positive.
    """

    def __init__(self, initial: float, target_quantile: float, lr: float, count_noise_std: float,
                 seed: int) -> None:
        if not initial > 0 or not math.isfinite(initial):
            fail("privacy.clip_norm", initial, "a finite value > 0")
        if not 0 < target_quantile < 1:
            fail("privacy.target_quantile", target_quantile, "a value in (0, 1)")
        if not lr > 0 or not math.isfinite(lr):
            fail("privacy.clip_lr", lr, "a finite value > 0")
        if not count_noise_std >= 0 or not math.isfinite(count_noise_std):
            fail("privacy.count_noise_std", count_noise_std, "a finite value >= 0")
        if not (_is_count(seed) and 0 <= seed < 2**32):
            fail("seed", seed, "an integer in [0, 2**32)")
        self.clip_norm = float(initial)
        self.target_quantile = float(target_quantile)
        self.lr = float(lr)
        self.count_noise_std = float(count_noise_std)
        self.seed = int(seed)
        self._below = 0  # updates of this step with norm <= clip_norm
        self._seen = 0  # updates of this step observed

    def observe(self, norm: float) -> None:
        """Count one update's norm, taken before clipping; only counts are kept, so order does not matter."""
        if math.isnan(norm) or norm < 0:
            raise ValueError(f"an update norm must be >= 0, got {norm!r}")
        self._seen += 1
        self._below += int(norm <= self.clip_norm)

    def end_step(self, step: int, expected_count: int) -> float:
        """Apply the update rule, reset the counts, and return the new clip norm.

        The denominator is the expected cohort size, not the count seen, for the same reason the update
        sum has a fixed denominator. The count noise comes from derive_seed(seed, "clip_count", step), so a
        resumed run draws the same noise for the same step.
        """
        if not (_is_count(expected_count) and expected_count >= 1):
            raise ValueError(f"expected_count must be an integer >= 1, got {expected_count!r}")
        noise = 0.0
        if self.count_noise_std > 0:
            rng = np.random.default_rng(derive_seed(self.seed, "clip_count", step))
            noise = float(rng.normal(0.0, self.count_noise_std))
        b_bar = (self._below + noise) / expected_count
        self.clip_norm = self.clip_norm * math.exp(-self.lr * (b_bar - self.target_quantile))
        self._below = self._seen = 0
        return self.clip_norm

    def state(self) -> dict[str, Any]:
        """JSON-serializable: the current clip norm and the counts of a step not yet ended."""
        return {"clip_norm": self.clip_norm, "below": self._below, "seen": self._seen}

    def load_state(self, state: dict[str, Any]) -> None:
        if not state["clip_norm"] > 0:
            raise ValueError(f"adaptive clip state has clip_norm {state['clip_norm']!r}: expected > 0")
        if not 0 <= state["below"] <= state["seen"]:
            raise ValueError(f"adaptive clip state has counts below={state['below']}, seen={state['seen']}: "
                             "expected 0 <= below <= seen")
        self.clip_norm = float(state["clip_norm"])
        self._below = int(state["below"])
        self._seen = int(state["seen"])
