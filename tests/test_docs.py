"""The documentation site builds with every link, anchor and page accounted for, and the examples of
docs/extending.md run as written and do what the page says they do."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from fedsim.algorithms import CLIENT_STRATEGIES, SERVER_STRATEGIES
from fedsim.cli import main
from fedsim.clientdata import load_client_data
from fedsim.data import DATASETS
from fedsim.data.real import REAL_DATASETS
from fedsim.data.schema import OPTION_LETTERS
from fedsim.models.adapter import adapter_files, get_weights
from fedsim.models.loading import load_model
from fedsim.scenarios import STEPS
from fedsim.seeding import derive_seed
from fedsim.validation import load_config

from conftest import REPO
from real_fixtures import write_image

EXTENDING = REPO / "docs" / "extending.md"
# A fenced block with a title (```python title="fedsign.py"): a file of the examples, run by the test below.
# mkdocs-material shows the title above the block; GitHub reads the language and ignores the rest.
TITLED_BLOCK = re.compile(r'^```\w+ title="(?P<title>[^"]+)"\n(?P<body>.*?)^```$', re.MULTILINE | re.DOTALL)
EXAMPLES = ("fedsign", "ffa_lora", "posts", "noisy_labels")  # each a .py file and its .yaml config layer
REGISTRIES = (SERVER_STRATEGIES, CLIENT_STRATEGIES, REAL_DATASETS, DATASETS, STEPS)


def mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of ``root``/mkdocs.yml into ``site``."""
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(root / "mkdocs.yml"), "--site-dir", str(site)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # the theme's banner about MkDocs 2


def test_the_site_builds_with_no_broken_link(tmp_path):
    build = mkdocs_build(REPO, tmp_path / "site")
    assert build.returncode == 0, build.stderr
    assert (tmp_path / "site" / "extending" / "index.html").is_file()


def test_broken_links_missing_anchors_and_pages_outside_the_nav_fail_the_build(tmp_path):
    """The check bites: each kind of mistake fails the build, and the log names it."""
    for name in ("mkdocs.yml", "README.md"):  # the README is the home page
        shutil.copy(REPO / name, tmp_path)
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    page = tmp_path / "docs" / "extending.md"
    page.write_text(page.read_text() + "\n[gone](no-such-page.md), [nowhere](configuration.md#no-such-heading), "
                                       "[root](/index.md)\n")
    (tmp_path / "docs" / "orphan.md").write_text("# A page in no nav\n")
    build = mkdocs_build(tmp_path, tmp_path / "site")
    assert build.returncode != 0
    for mistake in ("'extending.md' contains a link 'no-such-page.md'",
                    "does not contain an anchor '#no-such-heading'",
                    "'extending.md' contains an absolute link '/index.md'",
                    'not included in the "nav" configuration:\n  - orphan.md'):
        assert mistake in build.stderr, (mistake, build.stderr)


# -- docs/extending.md -----------------------------------------------------------------------------------------

POSTS_TRAIN = [("pic0.png", "Lovely sunset at the beach", "positive"), ("", "Train delayed again", "negative"),
               ("pic1.png", "The meeting is at noon", "neutral"), ("pic2.png", "Best concert ever", "positive"),
               ("", "My phone broke", "negative"), ("pic3.png", "Rain expected tomorrow", "neutral"),
               ("pic4.png", "So proud of my team", "positive"), ("", "Lost my keys", "negative")]
POSTS_TEST = [("pic5.png", "What a day", "positive"), ("", "The shop opens at nine", "neutral")]


def write_posts(root: Path) -> Path:
    """A folder in the layout of the page's ``posts`` adapter."""
    (root / "images").mkdir(parents=True)
    for split, rows in (("train", POSTS_TRAIN), ("test", POSTS_TEST)):
        with open(root / f"{split}.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "text", "label"])
            for i, (image, text, label) in enumerate(rows):
                if image:
                    write_image(root / "images" / image, i)
                writer.writerow([f"images/{image}" if image else "", text, label])
    return root


@pytest.fixture
def examples(tmp_path):
    """The page's titled blocks as files of a folder; what importing them as plugins registers is unregistered
    afterwards, so no other test sees it."""
    folder = tmp_path / "mine"
    folder.mkdir()
    blocks = {m["title"]: m["body"] for m in TITLED_BLOCK.finditer(EXTENDING.read_text())}
    assert set(blocks) == {*(f"{n}.py" for n in EXAMPLES), *(f"{n}.yaml" for n in EXAMPLES)}
    for title, body in blocks.items():
        (folder / title).write_text(body)
    before = [dict(registry) for registry in REGISTRIES]
    yield folder
    for name in [m for m in sys.modules if m.startswith("fedsim_plugin_")]:
        del sys.modules[name]
    for registry, entries in zip(REGISTRIES, before):
        registry.clear()
        registry.update(entries)


@pytest.mark.slow
def test_the_extending_examples_run_and_do_what_the_page_says(examples, tmp_path):
    """One federation with the four examples as plugins, selected by their YAML layers: the posts dataset,
    noisy labels on client 0 (every row, to make the check exact), FFA-LoRA clients and the FedSign server."""
    run_dir = tmp_path / "run"
    plugins = json.dumps([str(examples / f"{name}.py") for name in EXAMPLES])
    assert main([
        "run", str(REPO / "experiments" / "quickstart.yaml"),
        *(str(examples / f"{name}.yaml") for name in EXAMPLES),
        f"data.path={write_posts(tmp_path / 'posts')}", "data.scenarios.noisy_labels.rate=1.0",
        "data.scenarios.noisy_labels.clients=1", "partition.num_clients=2", "partition.scheme=iid",
        "federation.clients_per_round=2", "federation.rounds=1", "training.local_epochs=1", "training.batch_size=4",
        "eval.zero_shot=false", "runtime.engine=sequential", "output.progress=never", f"output.dir={run_dir}",
        f"plugins={plugins}"]) == 0
    cfg = load_config(run_dir / "config.yaml")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["client_updates"] == 2

    # posts: every training row reaches exactly one client, as the adapter read it; its metric heads the summary
    data = load_client_data(cfg)
    train = data.splits.train
    assert sorted(np.concatenate(data.shards).tolist()) == list(range(len(POSTS_TRAIN)))
    assert list(train["text"]) == [text for _, text, _ in POSTS_TRAIN]
    assert list(train["has_image"]) == [bool(image) for image, _, _ in POSTS_TRAIN]
    assert set(train["source"]) == {"posts"} and summary["headline_metric"] == "macro_f1"

    # noisy_labels: client 0's rows all carry another option, answer letter included; client 1's are untouched
    clean = load_client_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, scenarios={})))
    classes = ["negative", "neutral", "positive"]
    assert list(clean.splits.train["options"]) == [classes] * len(POSTS_TRAIN)
    assert list(clean.splits.train["label"]) == [classes.index(label) for _, _, label in POSTS_TRAIN]
    labels, clean_labels = np.asarray(train["label"]), np.asarray(clean.splits.train["label"])
    noisy, untouched = data.shards
    assert len(noisy) and (labels[noisy] != clean_labels[noisy]).all()
    np.testing.assert_array_equal(labels[untouched], clean_labels[untouched])
    assert list(train["answer"]) == [OPTION_LETTERS[label] for label in labels]

    # ffa_lora: the A matrices are those of the initial adapter, bit for bit; fedsign: B (zero at the start)
    # moved by exactly one step of lr, or not at all, in every entry
    final = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    loaded = load_model(cfg.model, derive_seed(cfg.seed, "lora_init"))
    initial = load_safetensors(adapter_files(loaded.model, get_weights(loaded.model))["adapter_model.safetensors"])
    a_keys, b_keys = [k for k in final if "lora_A" in k], [k for k in final if "lora_B" in k]
    assert a_keys and len(b_keys) == len(a_keys) and len(final) == len(a_keys) + len(b_keys)
    assert all(torch.equal(final[k], initial[k]) for k in a_keys)
    assert all(not initial[k].any() for k in b_keys)
    steps = torch.cat([final[k].flatten() for k in b_keys]) / cfg.algorithm.server.lr
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)
    assert set(steps.round().unique().tolist()) <= {-1.0, 0.0, 1.0} and steps.abs().max() == pytest.approx(1)
