"""Heterogeneity scenarios (FedMLLM's, and beyond) as composable, seeded steps.

A config names its steps as a mapping ``{step: {param: value}}`` (``data.scenarios``), applied in the
order written to the training split after partitioning. Each step is a small dataclass registered in
``STEPS``; its fields are its parameters. Steps only transform rows that belong to a client:

- modality steps decide, per row, whether it keeps its image and its text (``missing``, ``cross``,
  ``hybrid``); they only remove, so a row that already lacks a modality stays without it;
- ``multilingual`` translates each client's prompts and answers into the client's language;
- ``domain`` shifts each client's image style (noise, blur, palette, inversion).

``modality_task`` (image+question clients beside text-only QA clients, each with their own data source)
changes where client data comes from, not how rows look; ``fedsim.clientdata`` builds it, and here it is
only declared and checked. Each step draws from its own seeded stream, so adding a step never changes the
draws of another.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np
from PIL import Image, ImageFilter

from fedsim.data import check_data_source
from fedsim.data.languages import LANGUAGES, translate
from fedsim.data.real import REAL_DATASETS
from fedsim.seeding import rng_for

if TYPE_CHECKING:  # imported where a dataset is built: the Ray driver imports this module but builds none (~95 MB)
    import datasets

STEPS: dict[str, type[Step]] = {}


def register(cls: type[Step]) -> type[Step]:
    STEPS[cls.name] = cls
    return cls


@dataclass
class Step:
    """One scenario step. ``stream`` keeps its random draws apart from every other step's."""

    name: ClassVar[str] = ""
    stream: ClassVar[int] = -1

    def check(self, key: str, num_clients: int) -> None:
        """Raise ValueError, naming ``key`` and the parameter, for values out of range."""

    def check_data(self, key: str, data: Any) -> None:
        """Raise ValueError, naming the key, when the step cannot take the rows ``data`` (the DataConfig) gives."""

    def apply(self, ds: datasets.Dataset, client_of: np.ndarray, num_clients: int, seed: int,
              stream: str) -> datasets.Dataset:
        """``ds`` transformed; ``client_of[row]`` is the row's client, -1 for rows of no client."""
        return ds


@dataclass
class ModalityStep(Step):
    """A step that decides which modalities each row keeps."""

    def keep(self, client_of: np.ndarray, num_clients: int, seed: int, stream: str) -> np.ndarray:
        """Bool (rows, 2): column 0 keeps the image, column 1 the text."""
        raise NotImplementedError

    def apply(self, ds: datasets.Dataset, client_of: np.ndarray, num_clients: int, seed: int,
              stream: str) -> datasets.Dataset:
        import datasets

        keep = self.keep(client_of, num_clients, seed, stream)
        keep[client_of < 0] = True
        raw = ds.cast_column("image", datasets.Image(decode=False))  # no decoding/re-encoding of images
        out = raw.map(_drop, with_indices=True, batched=True, fn_kwargs={"keep": keep}, features=raw.features,
                      desc=f"scenario {self.name}")
        return out.cast_column("image", ds.features["image"])


@register
@dataclass
class Aligned(Step):
    """Both modalities everywhere; the label skew comes from the partition (``partition.alpha``)."""

    name = "aligned"


@register
@dataclass
class Missing(ModalityStep):
    """Each row independently loses its image w.p. beta and its text w.p. beta (both: beta^2).

    With ``allow_both=False`` a row drawn to lose both keeps one of them, image or text by a fair coin;
    each modality is then lost w.p. beta - beta^2 / 2. The coin is drawn either way, so the two settings
    differ only on the rows that would lose both.
    """

    name = "missing"
    stream = 0
    beta: float
    allow_both: bool = True

    def check(self, key: str, num_clients: int) -> None:
        _check_unit(key, self.name, "beta", self.beta)
        if not isinstance(self.allow_both, (bool, np.bool_)):
            raise ValueError(f"{key}.missing.allow_both must be true or false, got {self.allow_both!r}")

    def keep(self, client_of: np.ndarray, num_clients: int, seed: int, stream: str) -> np.ndarray:
        u = rng_for(seed, stream, self.stream).random((len(client_of), 3))  # per row, whatever its client
        keep = u[:, :2] >= self.beta
        if not self.allow_both:
            neither = ~keep.any(axis=1)
            keep[neither, 0] = u[neither, 2] < 0.5
            keep[neither, 1] = ~keep[neither, 0]
        return keep


@register
@dataclass
class Cross(ModalityStep):
    """Exactly ``image_only`` clients (chosen by seed) hold images only, the others text only."""

    name = "cross"
    stream = 1
    image_only: int

    def check(self, key: str, num_clients: int) -> None:
        _check_count(key, self.name, "image_only", self.image_only, num_clients)

    def keep(self, client_of: np.ndarray, num_clients: int, seed: int, stream: str) -> np.ndarray:
        chosen = np.zeros(max(num_clients, 1), dtype=bool)
        chosen[rng_for(seed, stream, self.stream).choice(num_clients, size=int(self.image_only), replace=False)] = True
        image = chosen[np.maximum(client_of, 0)]
        return np.stack([image, ~image], axis=1)


HYBRID_COINS = ("client", "sample")


@register
@dataclass
class Hybrid(ModalityStep):
    """Each client keeps each modality w.p. p, drawn once per client; a client drawn to keep neither keeps
    one at random by a fair coin, so a modality is kept w.p. p + (1 - p)^2 / 2.

    ``coin: client`` (default) flips that coin once per client, so every client holds one modality pattern
    (as the authors' medical code does); ``coin: sample`` flips it per row, as the authors' Hateful-Memes and
    CrisisMMD code does, so such a client holds image-only and text-only rows, about half each. The
    per-client draws are the same either way.
    """

    name = "hybrid"
    stream = 2
    p: float
    coin: str = "client"

    def check(self, key: str, num_clients: int) -> None:
        _check_unit(key, self.name, "p", self.p)
        if self.coin not in HYBRID_COINS:
            raise ValueError(f"{key}.hybrid.coin must be one of {', '.join(HYBRID_COINS)} (a client drawn to keep "
                             f"neither modality flips its coin once, or once per sample), got {self.coin!r}")

    def keep(self, client_of: np.ndarray, num_clients: int, seed: int, stream: str) -> np.ndarray:
        patterns, neither = [], []
        for client in range(num_clients):
            rng = rng_for(seed, stream, self.stream, client)  # per client: independent of the other clients
            pattern = rng.random(2) < self.p
            coin = rng.random() < 0.5
            neither.append(not pattern.any())
            patterns.append(pattern if pattern.any() else np.array([coin, not coin]))
        table = np.array(patterns or [[True, True]], dtype=bool)
        keep = table[np.maximum(client_of, 0)]
        for client in np.flatnonzero(neither) if self.coin == "sample" else ():
            rows = np.flatnonzero(client_of == client)
            image = rng_for(seed, stream, self.stream, int(client), 1).random(len(rows)) < 0.5
            keep[rows] = np.stack([image, ~image], axis=1)
        return keep


@register
@dataclass
class Multilingual(Step):
    """Each client's prompts, notes, option texts and open answers in one language of ``languages``
    (templated translations of the synthetic benchmark, fedsim/data/languages.py). Clients get the
    languages in turns over a seeded order, so the counts per language differ by at most one."""

    name = "multilingual"
    stream = 3
    languages: list = field(default_factory=lambda: list(LANGUAGES))

    def check(self, key: str, num_clients: int) -> None:
        unknown = [lang for lang in self.languages if lang not in LANGUAGES]
        if not self.languages or unknown:
            raise ValueError(f"{key}.multilingual.languages must be a non-empty list of {', '.join(LANGUAGES)}; "
                             f"got {self.languages!r}")

    def check_data(self, key: str, data: Any) -> None:
        real = [source for source in data_sources(data) if source != "synthetic"]
        if real:
            raise ValueError(f"config key '{key}.multilingual' has invalid value {dataclasses.asdict(self)!r}: "
                             f"expected no multilingual step with dataset {real[0]!r}; it translates the synthetic "
                             "benchmark's templates only (data.dataset and any modality_task text_dataset must be "
                             "'synthetic')")

    def apply(self, ds: datasets.Dataset, client_of: np.ndarray, num_clients: int, seed: int,
              stream: str) -> datasets.Dataset:
        langs = _in_turns(self.languages, num_clients, rng_for(seed, stream, self.stream))
        return ds.map(lambda row, i: translate(row, langs[client_of[i]]) if client_of[i] >= 0 else row,
                      with_indices=True, features=ds.features, desc="scenario multilingual")


DOMAIN_STYLES = ("clean", "noise", "blur", "palette", "invert")


@register
@dataclass
class Domain(Step):
    """Each client's images in one style of ``styles`` (given in turns over a seeded client order):
    ``noise`` adds Gaussian pixel noise (sigma 80 * strength), ``blur`` a Gaussian blur (radius
    strength * size / 16), ``palette`` pulls colours towards a sepia cast (by strength), ``invert`` takes
    the colour negative (a hard shift: colours turn into their complements). ``clean`` leaves them."""

    name = "domain"
    stream = 4
    styles: list = field(default_factory=lambda: list(DOMAIN_STYLES))
    strength: float = 0.5

    def check(self, key: str, num_clients: int) -> None:
        unknown = [s for s in self.styles if s not in DOMAIN_STYLES]
        if not self.styles or unknown:
            raise ValueError(f"{key}.domain.styles must be a non-empty list of {', '.join(DOMAIN_STYLES)}; "
                             f"got {self.styles!r}")
        _check_unit(key, self.name, "strength", self.strength)

    def restyle(self, image: Image.Image, style: str, rng: np.random.Generator) -> Image.Image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        if style == "noise":
            pixels = pixels + rng.normal(0, 80 * self.strength, pixels.shape)
        elif style == "blur":
            radius = self.strength * image.width / 16
            return image.convert("RGB").filter(ImageFilter.GaussianBlur(radius))
        elif style == "palette":
            grey = pixels.mean(axis=2, keepdims=True) * np.array([1.15, 1.0, 0.75], dtype=np.float32)
            pixels = (1 - self.strength) * pixels + self.strength * grey
        elif style == "invert":
            pixels = 255 - pixels
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    def apply(self, ds: datasets.Dataset, client_of: np.ndarray, num_clients: int, seed: int,
              stream: str) -> datasets.Dataset:
        styles = _in_turns(self.styles, num_clients, rng_for(seed, stream, self.stream))

        def restyle_row(row: dict, i: int) -> dict:
            client = client_of[i]
            if client >= 0 and row["image"] is not None and styles[client] != "clean":
                row["image"] = self.restyle(row["image"], styles[client], rng_for(seed, stream, self.stream, i))
            return row

        return ds.map(restyle_row, with_indices=True, features=ds.features, desc="scenario domain")


@register
@dataclass
class ModalityTask(Step):
    """Clients hold the configured dataset (image + question), a text-only QA source with its own task
    (``text_dataset``: ``synthetic`` with ``text_task``, or a real adapter read from ``text_path`` /
    ``text_hub`` at ``text_revision``), or both. Who holds what is set by exactly one of:

    - ``image_clients`` (the paper's cross form): clients 0..image_clients-1 hold the dataset, the others
      the text source;
    - ``p`` (the paper's hybrid form, as the authors' medical code draws it): each client holds each source
      w.p. p, drawn once per client; a client drawn to hold neither gets one by a fair coin. A client may
      hold both, so a source is held w.p. p + (1 - p)^2 / 2.

    Each source's training rows are partitioned (``partition``) over the clients that hold it. Both test
    splits are evaluated, each with its metrics.
    """

    name = "modality_task"
    stream = 5
    image_clients: Any = None
    p: Any = None
    text_dataset: str = "synthetic"
    text_task: str = "textqa"
    text_path: Any = None
    text_hub: Any = None
    text_revision: Any = None  # the text hub dataset's branch, tag or commit (data.revision pins the other)

    def check(self, key: str, num_clients: int) -> None:
        if key != "data.scenarios":
            raise ValueError(f"config key '{key}.{self.name}' is not allowed: expected modality_task under "
                             "data.scenarios only (it decides where each client's data comes from; the test split "
                             "then holds both sources' test rows)")
        if (self.image_clients is None) == (self.p is None):
            raise ValueError(f"{key}.modality_task takes exactly one of image_clients (the cross form: that many "
                             "clients hold the dataset, the others the text source) or p (the hybrid form: each "
                             "client holds each source w.p. p); got "
                             f"{'both' if self.p is not None else 'neither'}")
        if self.p is not None:
            _check_unit(key, self.name, "p", self.p)
            return
        _check_count(key, self.name, "image_clients", self.image_clients, num_clients)
        if not 0 < self.image_clients < num_clients:
            raise ValueError(f"{key}.modality_task.image_clients must leave both groups non-empty: an integer "
                             f"in [1, {num_clients - 1}] for {num_clients} clients, got {self.image_clients!r}")

    def holders(self, num_clients: int, seed: int) -> np.ndarray:
        """Bool (clients, 2): column 0 holds the configured dataset, column 1 the text source."""
        if self.p is None:
            image = np.arange(num_clients) < self.image_clients
            return np.stack([image, ~image], axis=1)
        table = np.zeros((num_clients, 2), dtype=bool)
        for client in range(num_clients):
            rng = rng_for(seed, "scenario", self.stream, client)  # per client: independent of the other clients
            pattern = rng.random(2) < self.p
            coin = rng.random() < 0.5
            table[client] = pattern if pattern.any() else (coin, not coin)
        return table

    def text_data(self, data: Any) -> Any:
        """The DataConfig of the text-only source: ``data`` with the step's dataset, task, path, hub and revision;
        ``data.test_seed`` carries over to a synthetic source only (a real one has its own test split)."""
        test_seed = data.test_seed if self.text_dataset == "synthetic" else None
        return dataclasses.replace(data, dataset=self.text_dataset, task=self.text_task, path=self.text_path,
                                   hub=self.text_hub, revision=self.text_revision, test_seed=test_seed)

    def check_data(self, key: str, data: Any) -> None:
        """The text source must be text-only (synthetic ``textqa`` or a text-only real adapter) and readable."""
        key = f"{key}.{self.name}"
        text_only = sorted(["synthetic"] + [name for name, adapter in REAL_DATASETS.items() if adapter.text_only])
        if self.text_dataset not in text_only:
            why = "its rows carry images" if self.text_dataset in REAL_DATASETS else "it is not a dataset"
            raise ValueError(f"config key '{key}.text_dataset' has invalid value {self.text_dataset!r}: expected a "
                             f"text-only source, one of {', '.join(text_only)} ({why})")
        if self.text_task != "textqa":
            raise ValueError(f"config key '{key}.text_task' has invalid value {self.text_task!r}: expected 'textqa', "
                             "the synthetic benchmark's text-only task (other tasks carry images; a real "
                             "text_dataset has its own task)")
        for rows in ("num_train", "num_test") if self.text_dataset == "synthetic" else ():
            if getattr(data, rows) <= 0:
                raise ValueError(f"config key 'data.{rows}' has invalid value {getattr(data, rows)!r}: expected a "
                                 f"number of rows > 0: {key}'s synthetic text source generates data.{rows} rows "
                                 "(0 means all rows only for a real dataset)")
        check_data_source(self.text_data(data), {field: f"{key}.text_{field}" for field in
                                                 ("dataset", "task", "path", "hub", "revision")})


def build_steps(spec: dict, key: str) -> list[Step]:
    """The steps a ``{step: {param: value}}`` mapping names, in order; ValueError names the bad key."""
    steps = []
    for name, params in dict(spec).items():
        if name not in STEPS:
            raise ValueError(f"{key}: scenario step {name!r} is unknown: expected one of {', '.join(sorted(STEPS))}")
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise ValueError(f"{key}.{name} must be a mapping of parameters (e.g. {{}}), got {params!r}")
        accepted = [f.name for f in dataclasses.fields(STEPS[name])]
        required = [f.name for f in dataclasses.fields(STEPS[name])
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        unknown = sorted(set(params) - set(accepted))
        missing = [k for k in required if k not in params]
        if unknown or missing:
            raise ValueError(f"{key}.{name} takes parameters {accepted or 'none'} (required: {required or 'none'}); "
                             f"got unknown {unknown or 'none'}, missing {missing or 'none'}")
        steps.append(STEPS[name](**params))
    return steps


def check_scenarios(spec: dict, key: str, num_clients: int, data: Any = None) -> None:
    """Fail early on unknown steps, wrong parameter names and out-of-range values; given ``data`` (the
    DataConfig), also on steps that its sources cannot take."""
    steps = build_steps(spec, key)
    for step in steps:
        step.check(key, num_clients)
    for step in steps if data is not None else []:
        step.check_data(key, data)


def data_sources(data: Any) -> list[str]:
    """The datasets whose rows a run holds: ``data.dataset``, then modality_task's text source if any."""
    tasks = {name: params for name, params in dict(data.scenarios).items() if name == ModalityTask.name}
    return [data.dataset] + [step.text_dataset for step in build_steps(tasks, "data.scenarios")]


def apply_scenarios(ds: datasets.Dataset, shards: Sequence[np.ndarray], spec: dict, seed: int,
                    key: str = "data.scenarios", stream: str = "scenario") -> datasets.Dataset:
    """``ds`` after every step of ``spec`` (same rows, same order, same features); deterministic in
    ``seed``. ``stream`` names the seed stream, so a test split's draws differ from the training split's."""
    client_of = client_index(shards, len(ds))
    for step in build_steps(spec, key):
        step.check(key, len(shards))
        ds = step.apply(ds, client_of, len(shards), seed, stream)
    return ds


def modality_mix(train: datasets.Dataset, shards: Sequence[np.ndarray]) -> np.ndarray:
    """Per-client counts, columns (both, image only, text only), plus (neither) when any row has neither."""
    has_image = np.asarray(train.with_format("numpy")["has_image"], dtype=bool)
    has_text = np.asarray(train.with_format("numpy")["has_text"], dtype=bool)
    kinds = [has_image & has_text, has_image & ~has_text, ~has_image & has_text, ~has_image & ~has_text]
    mix = np.array([[int(k[np.asarray(idx, dtype=np.int64)].sum()) for k in kinds] for idx in shards],
                   dtype=np.int64).reshape(len(shards), 4)
    return mix if mix[:, 3].any() else mix[:, :3]


def client_index(shards: Sequence[np.ndarray], num_rows: int) -> np.ndarray:
    """Each row's client, -1 for rows of no client; shards must be disjoint and index into the split."""
    client_of = np.full(num_rows, -1, dtype=np.int64)
    for client, idx in enumerate(shards):
        idx = np.asarray(idx, dtype=np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= num_rows):
            raise ValueError(f"shards index rows outside [0, {num_rows}): client {client} has "
                             f"range [{idx.min()}, {idx.max()}]")
        if (client_of[idx] >= 0).any() or len(np.unique(idx)) != idx.size:
            raise ValueError(f"shards must be disjoint: client {client} shares rows with another client")
        client_of[idx] = client
    return client_of


def _in_turns(choices: list, num_clients: int, rng: np.random.Generator) -> list:
    """One choice per client, dealt in turns over a seeded client order: counts differ by at most one."""
    dealt = [None] * num_clients
    for turn, client in enumerate(rng.permutation(num_clients)):
        dealt[client] = choices[turn % len(choices)]
    return dealt


def _drop(batch: dict, indices: list[int], keep: np.ndarray) -> dict:
    rows = keep[np.asarray(indices, dtype=np.int64)]
    batch["image"] = [im if k else None for im, k in zip(batch["image"], rows[:, 0])]
    batch["text"] = [tx if k else None for tx, k in zip(batch["text"], rows[:, 1])]
    batch["has_image"] = [bool(h and k) for h, k in zip(batch["has_image"], rows[:, 0])]
    batch["has_text"] = [bool(h and k) for h, k in zip(batch["has_text"], rows[:, 1])]
    return batch


def _check_unit(key: str, step: str, param: str, value: Any) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)) or not 0 <= value <= 1:
        raise ValueError(f"{key}.{step}.{param} must be a probability in [0, 1], got {value!r}")


def _check_count(key: str, step: str, param: str, value: Any, num_clients: int) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or not 0 <= value <= num_clients:
        raise ValueError(f"{key}.{step}.{param} must be an integer in [0, {num_clients}] (the number of "
                         f"clients), got {value!r}")
