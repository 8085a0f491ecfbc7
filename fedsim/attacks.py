"""Byzantine clients: which clients attack, and what each sends instead of its honest update.

Attackers are drawn once per run from its seed (``attack.fraction`` of all clients, the same set on every
engine and after a resume) and recorded in summary.json. An attacker trains as usual and then replaces its
delta Δ before anything else happens to it (compression, clipping, noise: see fedsim/uplink.py), as the
attacks of the robustness literature do:

- ``sign_flip``: sends −c·Δ (c = ``attack.scale``);
- ``gaussian``: sends noise N(0, scale²) in every coordinate, whatever it trained;
- ``scale``: sends boost·Δ, the model replacement of Bagdasaryan et al. (AISTATS 2020) with boost K / η
  (cohort size over server lr) when ``attack.scale`` is 0;
- ``free_rider``: sends a zero update (the global model back), as a client that never trains would.

Two attacks poison an attacker's training rows instead (``poison``), and send the update honestly:

- ``label_flip``: every multiple-choice row is trained on the next option, (label + 1) mod options;
- ``backdoor``: a trigger in ONE modality, a patch in the image's corner or a word in the text, mapped to
  ``attack.target_label``, planted in ``attack.poison_fraction`` of the attacker's rows that hold that
  modality (a text-only client plants no image trigger). ``triggered_test`` builds what the evaluation scores
  its success on: the test rows that hold the modality and another label, triggered, labelled with the target,
  so that their accuracy is the attack success rate (``asr_<modality>/accuracy`` in the metrics).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from fedsim.config import AttackConfig, ExperimentConfig
from fedsim.data.schema import OPTION_LETTERS
from fedsim.messages import NamedTensors
from fedsim.seeding import derive_seed, rng_for, sample_without_replacement

if TYPE_CHECKING:  # imported where a dataset is built: the Ray driver imports this module but builds none (~95 MB)
    import datasets

KINDS = ("sign_flip", "gaussian", "scale", "free_rider")  # what an attacker sends
POISONING = ("label_flip", "backdoor")  # what an attacker trains on
TRIGGER_WORD = "cf"  # a rare token, the textual trigger of the backdoor literature
HAS = {"image": "has_image", "text": "has_text"}


def choose_attackers(cfg: ExperimentConfig) -> np.ndarray:
    """The attacking clients' ids, sorted: round(fraction · N) of them, drawn from the run's seed."""
    n = cfg.partition.num_clients
    count = round(cfg.attack.fraction * n) if cfg.attack.kind != "none" else 0
    return np.sort(sample_without_replacement(rng_for(cfg.seed, "attackers"), n, count))


def boost(cfg: ExperimentConfig) -> float:
    """The ``scale`` attack's factor: ``attack.scale``, or K / η (replace the global model) when it is 0."""
    if cfg.attack.scale > 0:
        return cfg.attack.scale
    lr = cfg.algorithm.server.lr if cfg.algorithm.server.lr is not None else 1.0
    return cfg.clients_per_round() / lr


def attack(delta: NamedTensors, cfg: ExperimentConfig, seed_round: int, client: int) -> NamedTensors:
    """What attacking ``client`` sends for its honest ``delta`` in the task of ``seed_round``."""
    kind, scale = cfg.attack.kind, cfg.attack.scale
    if kind == "sign_flip":
        return {k: d * -scale for k, d in delta.items()}
    if kind == "scale":
        factor = boost(cfg)
        return {k: d * factor for k, d in delta.items()}
    if kind == "free_rider":
        return {k: torch.zeros_like(d) for k, d in delta.items()}
    if kind == "gaussian":
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "attack", seed_round, client))
        return {k: torch.randn(d.shape, generator=generator, dtype=torch.float32) * scale for k, d in delta.items()}
    raise ValueError(f"config key 'attack.kind' has invalid value {kind!r}: expected one of {', '.join(KINDS)}")


def _relabel(row: dict, label: int) -> dict:
    if not row["options"]:
        raise ValueError("config key 'attack.kind' needs multiple-choice rows (with options) to relabel; a row "
                         f"of source {row.get('source')!r} has none")
    if label >= len(row["options"]):
        raise ValueError(f"config key 'attack.target_label' has invalid value {label}: a row of source "
                         f"{row.get('source')!r} has {len(row['options'])} options")
    return {**row, "label": label, "answer": OPTION_LETTERS[label]}


def _image_patch(image: Image.Image) -> Image.Image:
    """A checkerboard in the bottom-right corner, an eighth of the image's side (at least 2 pixels)."""
    image = image.convert("RGB")  # a copy: the dataset's image stays clean
    side = max(2, min(image.size) // 8)
    x0, y0 = image.width - side, image.height - side
    for dx in range(side):
        for dy in range(side):
            image.putpixel((x0 + dx, y0 + dy), (255, 255, 255) if (dx + dy) % 2 else (0, 0, 0))
    return image


def plant_trigger(row: dict, attack_cfg: AttackConfig) -> dict:
    """``row`` with the trigger in ``attack.trigger``'s modality and the target label."""
    if attack_cfg.trigger == "image":
        row = {**row, "image": _image_patch(row["image"])}
    else:
        row = {**row, "text": f"{row['text']} {TRIGGER_WORD}"}
    return _relabel(row, attack_cfg.target_label)


def poison(rows: list[dict], row_ids: np.ndarray, cfg: ExperimentConfig, client: int) -> list[dict]:
    """An attacking client's training rows as it trains on them (``label_flip``, ``backdoor``); which rows a
    backdoor plants its trigger in depends on the seed, the client and the row alone."""
    attack_cfg = cfg.attack
    if attack_cfg.kind == "label_flip":
        return [_relabel(r, (r["label"] + 1) % max(len(r["options"]), 1)) for r in rows]
    out = []
    for row, row_id in zip(rows, row_ids.tolist()):
        chosen = derive_seed(cfg.seed, "poison", client, row_id) / 2**63 < attack_cfg.poison_fraction
        out.append(plant_trigger(row, attack_cfg) if chosen and row[HAS[attack_cfg.trigger]] else row)
    return out


def triggered_test(test: datasets.Dataset, attack_cfg: AttackConfig) -> datasets.Dataset:
    """The backdoor's success test: rows holding the trigger's modality, of another label, triggered."""
    import datasets

    keep = [i for i, (has, label) in enumerate(zip(test[HAS[attack_cfg.trigger]], test["label"]))
            if has and label != attack_cfg.target_label]
    rows = [plant_trigger(test[i], attack_cfg) for i in keep]
    return datasets.Dataset.from_list(rows, features=test.features)
