"""Real dataset adapters, looked up by the name used in ``data.dataset``: ``REAL_DATASETS[name].load(cfg, seed)``.

Each module maps one published dataset (a local folder in its own format, or a hub dataset) to fedsim's schema.
"""

from fedsim.data.real import crisismmd, hateful_memes, medalpaca, scienceqa, slake, vqa_rad  # noqa: F401 (register)
from fedsim.data.real.base import REAL_DATASETS, RealDataset

__all__ = ["REAL_DATASETS", "RealDataset"]
