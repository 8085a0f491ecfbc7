"""What every real dataset adapter shares: source checks, file readers, row builders, subsampling, the registry.

An adapter turns one published dataset into fedsim's common schema (``fedsim.data.schema.features()``). It reads
either a local folder in the source's own format (``data.path``) or a Hugging Face hub dataset (``data.hub``,
pinned to ``data.revision`` when set; a local folder ignores it, with a warning) and returns rows; this module
subsamples them, gives VQA answers their labels and builds the ``datasets``. Local images are stored as file
paths, so they are decoded only when a row is read. Image archives a hub dataset ships are unpacked through
``unpack_archive``, which refuses members that leave the target folder and bounds the unpacked size, once per
node (``unpack_once`` locks the cache folder against the node's other workers).
"""

from __future__ import annotations

import csv
import fcntl
import inspect
import json
import logging
import shutil
import stat
import sys
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

import numpy as np

from fedsim.data.schema import OPTION_LETTERS, DatasetSplits, features
from fedsim.output import atomic_dir

if TYPE_CHECKING:  # imported where a dataset is built: the Ray driver imports this module but builds none (~95 MB)
    import datasets

log = logging.getLogger("fedsim.data")

# A required entry under data.path: a relative path ("img/" for a folder) or a tuple of alternatives.
Required = Union[str, tuple[str, ...]]
HOLDOUT_STREAM = 1  # second seed word of the holdout draw, so it never repeats the subsampling draw

REAL_DATASETS: dict[str, "RealDataset"] = {}


def register(cls: type["RealDataset"]) -> type["RealDataset"]:
    """Class decorator: add one instance of the adapter to ``REAL_DATASETS`` under its ``name``, with its
    ``layout`` taken from the "Layout" section of its class docstring (a variant of an adapter, in the same
    module), else of its module's docstring."""
    if cls.name in REAL_DATASETS:
        raise ValueError(f"real dataset {cls.name!r} is registered twice")
    own = cls.__dict__.get("__doc__")
    cls.layout = (doc_section(inspect.cleandoc(own), "Layout") if own else "") \
        or doc_section(sys.modules[cls.__module__].__doc__, "Layout")
    REAL_DATASETS[cls.name] = cls()
    return cls


def doc_section(doc: Optional[str], title: str) -> str:
    """The indented block under the docstring line that starts with ``title`` (e.g. the layout), dedented."""
    lines = (doc or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith(title)), None)
    if start is None:
        return ""
    block = []
    for line in lines[start + 1:]:
        if line.strip() and not line.startswith(" "):
            break
        block.append(line)
    text = "\n".join(block).rstrip()
    indent = min((len(line) - len(line.lstrip()) for line in block if line.strip()), default=0)
    return "\n".join(line[indent:] for line in text.splitlines())


class RealDataset:
    """One published dataset in fedsim's schema. Subclasses set the class attributes and the row readers."""

    name: str  # registry name, = data.dataset
    task: str  # "classification" | "vqa"
    metric: str  # headline metric: "roc_auc" | "macro_f1" | "accuracy"
    layout: str  # the expected local files and columns (set by @register), shown in every data.path error
    required: tuple[Required, ...] = ()  # entries that must exist under data.path
    hub_example: str = ""  # the hub dataset the column mapping was written for
    hub_config: Optional[str] = None  # the hub dataset's configuration (subset), when it has several
    hub_splits: dict[str, tuple[str, ...]] = {"train": ("train",), "test": ("test",)}  # candidates, in order
    text_only: bool = False  # no row carries an image: usable as data.scenarios.modality_task's text source

    # -- source checks -------------------------------------------------------------------------------------

    def check_source(self, cfg: Any, path_key: str = "data.path", hub_key: str = "data.hub") -> None:
        """Fail early (ValueError) unless exactly one of data.path / data.hub is set and the folder is complete.
        ``path_key`` / ``hub_key`` name the keys in messages when the source is configured elsewhere."""
        path, _ = self.source(cfg, path_key, hub_key)
        if path is not None:
            self.resolve(path, path_key)

    def source(self, cfg: Any, path_key: str = "data.path",
               hub_key: str = "data.hub") -> tuple[Optional[Path], Optional[str]]:
        """``(local folder, None)`` or ``(None, hub name)``; ValueError when neither or both are set."""
        path, hub = getattr(cfg, "path", None) or None, getattr(cfg, "hub", None) or None
        if (path is None) == (hub is None):
            got = "both" if path is not None else "neither"
            raise ValueError(
                f"dataset {self.name!r} needs exactly one of {path_key} (a local folder in the source's format) "
                f"or {hub_key} (a Hugging Face hub dataset, e.g. {self.hub_example!r}); got {got}")
        return (Path(path).expanduser() if path is not None else None), hub

    def resolve(self, root: Path, path_key: str = "data.path") -> dict[Required, Path]:
        """The path of each required entry under ``root``; ValueError naming the folder and what is missing."""
        if not root.exists():
            raise self._layout_error(root, "does not exist", path_key)
        if not root.is_dir():
            raise self._layout_error(root, "is not a folder", path_key)
        found = {}
        for entry in self.required:
            alternatives = (entry,) if isinstance(entry, str) else entry
            hit = next((root / alt for alt in alternatives if _exists(root / alt, alt.endswith("/"))), None)
            if hit is None:
                others = f" (or {', '.join(repr(alt) for alt in alternatives[1:])})" if len(alternatives) > 1 else ""
                raise self._layout_error(root, f"lacks {alternatives[0]!r}{others}", path_key)
            found[entry] = hit
        return found

    def fields(self, items: list[dict], fields: Iterable[str], path: Path) -> list[dict]:
        """``items`` read from ``path``, after checking that the first one has ``fields`` (ValueError if not)."""
        missing = [field for field in fields if items and field not in items[0]]
        if missing:
            raise ValueError(f"{path} for dataset {self.name!r} lacks fields {missing} (it has {sorted(items[0])}); "
                             f"expected layout:\n{self.layout}")
        return items

    def _layout_error(self, root: Path, problem: str, path_key: str = "data.path") -> ValueError:
        return ValueError(f"{path_key} '{root}' for dataset {self.name!r} {problem}; expected layout:\n{self.layout}")

    # -- loading -------------------------------------------------------------------------------------------

    def load(self, cfg: Any, seed: int) -> DatasetSplits:
        """Train and test splits in fedsim's schema, each a seeded subsample of at most num_train / num_test rows."""
        self.check_source(cfg)
        path, hub = self.source(cfg)
        revision = getattr(cfg, "revision", None) or None
        if path is not None and revision is not None:
            log.warning("data.revision=%r is ignored: %s is read from the local folder %s, which has no revisions",
                        revision, self.name, path)
        splits = self.local_rows(path, seed) if path is not None else self.hub_rows(hub, seed, revision)
        rows = {}
        for split, limit in (("train", cfg.num_train), ("test", cfg.num_test)):
            present = drop_missing_images(splits[split], f"{self.name} {split}")
            if not present:
                raise ValueError(f"dataset {self.name!r} from {str(path or hub)!r} has no usable {split} rows; "
                                 f"expected layout:\n{self.layout}")
            rows[split] = subsample(present, limit, seed, f"{self.name} {split}")
        if self.task == "vqa":
            num_classes = assign_answer_labels(rows["train"], rows["test"])
        else:
            num_classes = max(len(row["options"]) for row in rows["train"] + rows["test"])
        return DatasetSplits(train=to_dataset(rows["train"]), test=to_dataset(rows["test"]),
                             num_classes=num_classes, task=self.task, metric=self.metric)

    def local_rows(self, root: Path, seed: int) -> dict[str, list[dict]]:
        """Rows of the ``train`` and ``test`` splits read from a local folder in the source's format."""
        raise NotImplementedError

    def hub_rows(self, hub: str, seed: int, revision: Optional[str] = None) -> dict[str, list[dict]]:
        """Rows of the ``train`` and ``test`` splits of a hub dataset at ``revision`` (None: its default
        branch), through ``map_hub``."""
        return {split: self.map_hub(load_hub_split(hub, self.hub_config, names, revision))
                for split, names in self.hub_splits.items()}

    def map_hub(self, ds: datasets.Dataset) -> list[dict]:
        """Map one split of the hub dataset (its own columns) to schema rows."""
        raise NotImplementedError


# -- rows -------------------------------------------------------------------------------------------------


def _clean(text: Any) -> Optional[str]:
    """A context text, or None when the source has none (missing, empty or whitespace)."""
    if text is None:
        return None
    text = str(text).strip()
    return text or None


def _row(source: str, image: Any, text: Any, question: str, answer: str, label: int, options: list[str],
         task: str) -> dict:
    text = _clean(text)
    return {"image": image, "text": text, "question": str(question).strip(), "answer": answer, "label": int(label),
            "options": options, "has_image": image is not None, "has_text": text is not None, "task": task,
            "source": source}


def choice_row(source: str, question: str, options: list[str], index: int, image: Any = None,
               text: Any = None) -> dict:
    """A multiple-choice row: the answer is the letter of option ``index``."""
    options = [str(option) for option in options]
    if not 0 <= index < len(options):
        raise ValueError(f"{source}: answer index {index} outside the {len(options)} options {options}")
    return _row(source, image, text, question, OPTION_LETTERS[index], index, options, "classification")


def open_row(source: str, question: str, answer: Any, image: Any = None, text: Any = None) -> dict:
    """An open question; its label is set later from the train answer vocabulary."""
    return _row(source, image, text, question, str(answer).strip(), -1, [], "vqa")


def image_file(path: Path) -> str:
    """A local image stored by path: decoded by the Image feature only when the row is read."""
    return str(path.resolve())


def hub_images(ds: datasets.Dataset, column: str) -> list[Optional[dict]]:
    """The image column of a hub split as undecoded {"bytes", "path"} dicts (None where a row has no image)."""
    import datasets

    return list(ds.cast_column(column, datasets.Image(decode=False))[column])


def require_columns(ds: datasets.Dataset, columns: Iterable[str], name: str) -> None:
    """ValueError naming the columns a hub split lacks for the mapping of dataset ``name``."""
    missing = [column for column in columns if column not in ds.column_names]
    if missing:
        raise ValueError(f"hub split for dataset {name!r} lacks columns {missing}; it has {ds.column_names}")


def drop_missing_images(rows: list[dict], what: str) -> list[dict]:
    """Rows whose image is absent (None where one is expected is the adapter's call) or a path that is gone."""
    kept = [row for row in rows if not isinstance(row["image"], str) or Path(row["image"]).is_file()]
    if len(kept) < len(rows):
        log.warning("%s: dropped %d of %d rows whose image file is missing", what, len(rows) - len(kept), len(rows))
    return kept


def subsample(rows: list[dict], limit: int, seed: int, what: str) -> list[dict]:
    """At most ``limit`` rows (0: all), drawn with ``default_rng(seed)``, in their source order."""
    if limit <= 0 or len(rows) <= limit:
        return rows
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=limit, replace=False))
    log.info("%s: kept a seeded subsample of %d of %d rows", what, limit, len(rows))
    return [rows[i] for i in keep]


def holdout(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split a source without an official test set: ``fraction`` of the rows (at least one) go to test.

    The test rows are ``default_rng([seed, HOLDOUT_STREAM]).permutation(n)[:ceil(fraction * n)]``; both parts
    keep the source order.
    """
    n = len(rows)
    size = min(n, max(1, int(np.ceil(fraction * n)))) if n else 0
    test = np.zeros(n, dtype=bool)
    test[np.random.default_rng([seed, HOLDOUT_STREAM]).permutation(n)[:size]] = True
    return [r for r, t in zip(rows, test) if not t], [r for r, t in zip(rows, test) if t]


def answer_key(answer: str) -> str:
    return answer.strip().lower()


def assign_answer_labels(train: list[dict], test: list[dict]) -> int:
    """Label open answers by their index in the sorted, lowercased train answer vocabulary (-1: unseen)."""
    vocab = {key: i for i, key in enumerate(sorted({answer_key(row["answer"]) for row in train}))}
    for row in train + test:
        row["label"] = vocab.get(answer_key(row["answer"]), -1)
    return len(vocab)


def to_dataset(rows: list[dict]) -> datasets.Dataset:
    import datasets

    return datasets.Dataset.from_dict({key: [row[key] for row in rows] for key in features()}, features=features())


# -- files ------------------------------------------------------------------------------------------------


def _exists(path: Path, folder: bool) -> bool:
    return path.is_dir() if folder else path.is_file()


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_tsv(path: Path) -> list[dict]:
    """Rows of a tab-separated file with a header; quotes are plain characters (tweets contain them)."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


# -- hub ---------------------------------------------------------------------------------------------------


def load_hub_split(hub: str, config: Optional[str], candidates: tuple[str, ...],
                   revision: Optional[str] = None) -> datasets.Dataset:
    """The first of ``candidates`` that the hub dataset has at ``revision`` (None: the default branch)."""
    import datasets

    available = datasets.get_dataset_split_names(hub, config, revision=revision)
    split = next((name for name in candidates if name in available), None)
    if split is None:
        at = f" at revision {revision!r}" if revision else ""
        raise ValueError(f"hub dataset {hub!r}{at} has splits {available}; expected one of {list(candidates)}")
    return datasets.load_dataset(hub, config, split=split, revision=revision)


def unpack_hub_archive(hub: str, filename: str, revision: Optional[str] = None) -> Path:
    """Download a zip that a hub dataset ships beside its tables and unpack it once into the datasets cache
    (through ``unpack_archive``'s checks: a hub repository is someone else's files)."""
    import datasets
    from huggingface_hub import hf_hub_download

    archive = Path(hf_hub_download(hub, filename, repo_type="dataset", revision=revision))
    folder = Path(filename).stem + (f"@{revision.replace('/', '__')}" if revision else "")
    target = Path(datasets.config.HF_DATASETS_CACHE) / "fedsim" / hub.replace("/", "__") / folder
    unpack_once(archive, target)
    return target


# -- archives ---------------------------------------------------------------------------------------------

# Bounds on one unpacked archive, checked on the sizes its members declare before anything is written (the
# zip reader stops each member at its declared size, so they bound what is written). SLAKE's imgs.zip holds
# about 2,000 files and 0.2 GB; the largest image archive of the datasets here (Hateful Memes) about 4 GB.
MAX_UNPACKED_BYTES = 16 * 2**30
MAX_MEMBERS = 200_000
# A member larger than RATIO_FLOOR bytes that is over MAX_RATIO times its compressed size is a zip bomb, not
# data (images and JSON compress far less).
MAX_RATIO = 100
RATIO_FLOOR = 2**20
UNPACKED_MARK = ".unpacked"  # written last: a folder without it was never finished


def _member_path(info: zipfile.ZipInfo) -> Optional[PurePosixPath]:
    """The member's path relative to the target folder, or None when it would leave it or is not a plain file
    or folder: absolute, with a drive, with '..', empty, a symlink or a device."""
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    kind = stat.S_IFMT(info.external_attr >> 16)
    if (path.is_absolute() or PureWindowsPath(info.filename).drive or ".." in path.parts or not path.parts
            or kind not in (0, stat.S_IFREG, stat.S_IFDIR)):
        return None
    return path


def check_archive(zf: zipfile.ZipFile, what: str, max_bytes: int = MAX_UNPACKED_BYTES,
                  max_members: int = MAX_MEMBERS) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Each member with its relative path, after refusing (ValueError naming ``what`` and the member) an archive
    with more than ``max_members`` members or ``max_bytes`` uncompressed bytes, a member with a zip-bomb
    ratio, or a member whose path leaves the target folder."""
    members = zf.infolist()
    fix = "; if you trust it, unpack it yourself and point data.path at the folder"
    if len(members) > max_members:
        raise ValueError(f"refusing to unpack {what}: {len(members)} members, more than the {max_members} "
                         f"allowed{fix}")
    checked, total = [], 0
    for info in members:
        path = _member_path(info)
        if path is None:
            raise ValueError(f"refusing to unpack {what}: member {info.filename!r} would be written outside the "
                             "target folder or is not a plain file (absolute paths, '..' and links are refused); "
                             "nothing was written")
        if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise ValueError(f"refusing to unpack {what}: member {info.filename!r} declares {info.file_size} bytes "
                             f"from {info.compress_size} compressed (over {MAX_RATIO}:1, a zip bomb); nothing was "
                             "written")
        total += info.file_size
        if total > max_bytes:
            raise ValueError(f"refusing to unpack {what}: its members declare more than {max_bytes} bytes "
                             f"uncompressed (the limit; reached at member {info.filename!r}){fix}")
        checked.append((info, path))
    return checked


def unpack_once(archive: Path, target: Path) -> None:
    """Unpack ``archive`` into ``target`` unless a finished copy is there.

    Every worker on a node shares the cache folder and may ask for the same archive at once. Unlocked, each
    would unpack its own copy and the renames would pull the folder from under the others' readers (and
    ``atomic_dir`` would sweep away their staging folders as crash leftovers). An exclusive ``flock`` on a file
    beside ``target`` lets one unpack while the others wait, then find the mark and read its folder; the kernel
    releases the lock when its holder exits, crashed or not.
    """
    if (target / UNPACKED_MARK).exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / UNPACKED_MARK).exists():  # another process may have finished while this one waited
            log.info("unpacking %s into %s", archive, target)
            unpack_archive(archive, target)


def unpack_archive(archive: Path, target: Path, max_bytes: int = MAX_UNPACKED_BYTES,
                   max_members: int = MAX_MEMBERS) -> None:
    """Unpack a zip into ``target`` (replacing it) after ``check_archive`` passed on every member.

    The files go to a staging folder beside ``target`` that becomes ``target`` in one rename, so a failure
    leaves no half-unpacked folder; ``target / UNPACKED_MARK`` marks a finished one.
    """
    with zipfile.ZipFile(archive) as zf:
        members = check_archive(zf, str(archive), max_bytes, max_members)
        target.parent.mkdir(parents=True, exist_ok=True)
        need = sum(info.file_size for info, _ in members)
        free = shutil.disk_usage(target.parent).free
        if need > free:
            raise ValueError(f"cannot unpack {archive}: it needs {need} bytes, {target.parent} has {free} free")
        with atomic_dir(target) as staging:
            for info, path in members:
                dest = staging / path
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as out:
                    written = 0
                    while chunk := src.read(2**20):
                        written += len(chunk)
                        if written > info.file_size:  # the reader stops at the declared size; never trust it
                            raise ValueError(f"refusing to unpack {archive}: member {info.filename!r} holds more "
                                             f"than the {info.file_size} bytes it declares")
                        out.write(chunk)
            (staging / UNPACKED_MARK).touch()
