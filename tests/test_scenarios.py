import numpy as np
import pytest

from fedsim.data.schema import features
from fedsim.data.synthetic import generate
from fedsim.scenarios import STEPS, apply_scenarios, modality_mix

N = 3000


@pytest.fixture(scope="module")
def train():
    return generate("classification", N, "train", 0)


@pytest.fixture(scope="module")
def shards():
    return [np.sort(s) for s in np.array_split(np.random.default_rng(7).permutation(N), 10)]


def _flags(ds) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(ds["has_image"], dtype=bool), np.asarray(ds["has_text"], dtype=bool)


def _check_consistent(ds) -> None:
    """Flags agree with the columns they describe, and the schema is unchanged."""
    assert ds.features == features()
    has_image, has_text = _flags(ds)
    images = ds.cast_column("image", features()["image"].__class__(decode=False))["image"]
    np.testing.assert_array_equal(has_image, [im is not None for im in images])
    np.testing.assert_array_equal(has_text, [tx is not None for tx in ds["text"]])


def test_missing_rates(train, shards):
    out = apply_scenarios(train, shards, {"missing": {"beta": 0.3}}, seed=1)
    _check_consistent(out)
    has_image, has_text = _flags(out)
    assert abs((~has_image).mean() - 0.3) <= 0.03
    assert abs((~has_text).mean() - 0.3) <= 0.03
    assert abs((~has_image & ~has_text).mean() - 0.09) <= 0.02
    np.testing.assert_array_equal(out["label"], train["label"])  # same rows, same order
    mix = modality_mix(out, shards)
    assert mix.shape == (10, 4) and mix.sum() == N


def test_missing_without_both(train, shards):
    both = apply_scenarios(train, shards, {"missing": {"beta": 0.3}}, seed=1)
    out = apply_scenarios(train, shards, {"missing": {"beta": 0.3, "allow_both": False}}, seed=1)
    has_image, has_text = _flags(out)
    assert not (~has_image & ~has_text).any()
    # Only the rows that would have lost both differ.
    b_image, b_text = _flags(both)
    changed = (b_image != has_image) | (b_text != has_text)
    np.testing.assert_array_equal(changed, ~b_image & ~b_text)
    assert modality_mix(out, shards).shape == (10, 3)


def test_cross_splits_clients(train, shards):
    out = apply_scenarios(train, shards, {"cross": {"image_only": 3}}, seed=1)
    _check_consistent(out)
    has_image, has_text = _flags(out)
    image_clients = [c for c, idx in enumerate(shards) if has_image[idx].all() and not has_text[idx].any()]
    text_clients = [c for c, idx in enumerate(shards) if has_text[idx].all() and not has_image[idx].any()]
    assert len(image_clients) == 3 and len(text_clients) == 7
    mix = modality_mix(out, shards)
    assert (mix[:, 0] == 0).all() and ((mix[:, 1] == 0) | (mix[:, 2] == 0)).all()


def test_hybrid_per_client_pattern(train, shards):
    out = apply_scenarios(train, shards, {"hybrid": {"p": 0.6}}, seed=1)
    _check_consistent(out)
    has_image, has_text = _flags(out)
    for idx in shards:
        assert len(set(zip(has_image[idx], has_text[idx]))) == 1  # one keep pattern per client
        assert has_image[idx[0]] or has_text[idx[0]]


def test_hybrid_rate_over_many_clients(train):
    small = train.select(range(1000))
    tiny = list(np.arange(1000).reshape(500, 2))
    has_image, has_text = _flags(apply_scenarios(small, tiny, {"hybrid": {"p": 0.6}}, seed=3))
    assert (has_image | has_text).all()
    # Kept w.p. p plus half of the (1-p)^2 clients that fall back to one modality: 0.68.
    assert abs(has_image[::2].mean() - (0.6 + 0.4**2 / 2)) <= 0.06
    assert abs(has_text[::2].mean() - (0.6 + 0.4**2 / 2)) <= 0.06


def test_hybrid_coin_per_sample_as_the_authors_hateful_memes_code(train):
    """p = 0.2: 64% of clients are drawn to keep neither; with coin: sample each of their rows keeps one
    modality by its own fair coin, the other clients are as under coin: client."""
    shards = list(np.arange(N).reshape(100, 30))
    per_client = _flags(apply_scenarios(train, shards, {"hybrid": {"p": 0.2}}, seed=2))
    per_sample = _flags(apply_scenarios(train, shards, {"hybrid": {"p": 0.2, "coin": "sample"}}, seed=2))
    image, text = per_sample
    assert (image | text).all()  # never neither
    mixed = [idx for idx in shards if image[idx].any() and text[idx].any() and not (image & text)[idx].any()]
    unchanged = [idx for idx in shards if all(np.array_equal(a[idx], b[idx]) for a, b in zip(per_client, per_sample))]
    assert len(mixed) + len(unchanged) == 100
    assert abs(len(mixed) - 64) <= 15  # (1 - p)^2 of 100 clients, binomial sd 4.8
    rows = np.concatenate(mixed)
    assert abs(image[rows].mean() - 0.5) <= 0.05  # ~1,900 rows, sd 0.011
    # a modality is still kept w.p. p + (1 - p)^2 / 2 = 0.52 overall
    assert abs(image.mean() - 0.52) <= 0.1 and abs(text.mean() - 0.52) <= 0.1
    with pytest.raises(ValueError, match="hybrid.coin"):
        apply_scenarios(train, shards, {"hybrid": {"p": 0.2, "coin": "row"}}, seed=2)


def test_modality_task_hybrid_holders_rates():
    from fedsim.scenarios import ModalityTask

    held = ModalityTask(p=0.6).holders(3000, seed=1)
    assert held.any(axis=1).all()  # every client holds a source
    assert abs(held[:, 0].mean() - (0.6 + 0.4**2 / 2)) <= 0.03 and abs(held[:, 1].mean() - 0.68) <= 0.03
    assert abs(held.all(axis=1).mean() - 0.36) <= 0.03  # both sources: p^2
    np.testing.assert_array_equal(ModalityTask(image_clients=3).holders(5, seed=1),
                                  [[True, False]] * 3 + [[False, True]] * 2)
    with pytest.raises(ValueError, match="exactly one of image_clients"):
        ModalityTask(image_clients=3, p=0.5).check("data.scenarios", 10)
    with pytest.raises(ValueError, match="exactly one of image_clients"):
        ModalityTask().check("data.scenarios", 10)
    with pytest.raises(ValueError, match="modality_task.p must be a probability"):
        ModalityTask(p=1.5).check("data.scenarios", 10)


def test_modality_task_hybrid_gives_a_client_both_sources():
    from fedsim.clientdata import load_client_data
    from fedsim.config import merge_config
    from fedsim.scenarios import ModalityTask

    cfg = merge_config(None, ["data.task=vqa", "data.num_train=200", "data.num_test=10", "partition.num_clients=10",
                              "data.scenarios.modality_task.p=0.6"])
    data = load_client_data(cfg)
    source = np.asarray(data.splits.train["source"])
    held = ModalityTask(p=0.6).holders(10, cfg.seed)
    assert held.all(axis=1).any()
    for client, shard in enumerate(data.shards):
        assert {"synthetic/vqa", "synthetic/textqa"} & set(source[shard]) == \
            {s for s, h in zip(("synthetic/vqa", "synthetic/textqa"), held[client]) if h}
    rows = np.concatenate(data.shards)
    assert len(rows) == len(np.unique(rows)) == len(source) == 400  # each source's rows, each to one holder


def test_aligned_is_identity(train, shards):
    out = apply_scenarios(train, shards, {"aligned": {}}, seed=1)
    assert out.features == train.features
    assert out["text"] == train["text"]
    np.testing.assert_array_equal(_flags(out), _flags(train))


def test_rows_outside_shards_untouched(train):
    out = apply_scenarios(train, [np.arange(100), np.arange(100, 200)], {"cross": {"image_only": 1}}, seed=0)
    has_image, has_text = _flags(out)
    assert has_image[200:].all() and has_text[200:].all()


@pytest.mark.parametrize("name,params", [("missing", {"beta": 0.4}), ("cross", {"image_only": 5}),
                                         ("hybrid", {"p": 0.7})])
def test_deterministic_by_seed(train, shards, name, params):
    a = _flags(apply_scenarios(train, shards, {name: params}, seed=11))
    b = _flags(apply_scenarios(train, shards, {name: params}, seed=11))
    np.testing.assert_array_equal(a, b)
    others = [_flags(apply_scenarios(train, shards, {name: params}, seed=s)) for s in (12, 13, 14)]
    assert any(not np.array_equal(a, o) for o in others)


def test_registry_names():
    assert set(STEPS) == {"aligned", "missing", "cross", "hybrid", "multilingual", "domain", "modality_task"}


@pytest.mark.parametrize("name,params,match", [
    ("mising", {"beta": 0.3}, "data.scenarios: scenario step 'mising' is unknown.*aligned, cross, domain"),
    ("missing", {}, "missing \\['beta'\\]"),
    ("missing", {"beta": 0.3, "rate": 1}, "unknown \\['rate'\\]"),
    ("missing", {"beta": 1.5}, "data.scenarios.missing.beta must be a probability in \\[0, 1\\]"),
    ("missing", {"beta": 0.3, "allow_both": "no"}, "allow_both"),
    ("cross", {"image_only": 11}, "image_only must be an integer in \\[0, 10\\]"),
    ("cross", {"image_only": 2.5}, "image_only"),
    ("hybrid", {"p": -0.1}, "p must be a probability"),
    ("aligned", {"p": 0.5}, "unknown \\['p'\\]"),
    ("multilingual", {"languages": ["en", "xx"]}, "multilingual.languages"),
    ("domain", {"styles": []}, "domain.styles"),
    ("domain", {"strength": 2}, "domain.strength"),
    ("missing", 0.3, "data.scenarios.missing must be a mapping"),
])
def test_errors(train, shards, name, params, match):
    with pytest.raises(ValueError, match=match):
        apply_scenarios(train, shards, {name: params}, seed=0)


def test_bad_shards(train):
    with pytest.raises(ValueError, match="disjoint"):
        apply_scenarios(train, [np.arange(10), np.arange(5, 15)], {"aligned": {}}, seed=0)
    with pytest.raises(ValueError, match="outside"):
        apply_scenarios(train, [np.arange(N + 1)], {"aligned": {}}, seed=0)


def test_steps_compose_in_order_and_keep_their_own_draws(train, shards):
    """Layering missing on hybrid removes more; each step draws from its own stream, so missing's per-row
    draws are the same with or without the hybrid step before it."""
    alone = _flags(apply_scenarios(train, shards, {"missing": {"beta": 0.3}}, seed=5))
    layered = _flags(apply_scenarios(train, shards, {"hybrid": {"p": 0.6}, "missing": {"beta": 0.3}}, seed=5))
    hybrid = _flags(apply_scenarios(train, shards, {"hybrid": {"p": 0.6}}, seed=5))
    for a, l, h in zip(alone, layered, hybrid):
        np.testing.assert_array_equal(l, a & h)


def test_alpha_partition_with_missing_beta_as_the_paper_layers_them():
    """alpha=0.5 label skew, then missing beta=0.3 on top: the rates hold on 3,000 rows, and the label
    skew of the partition is untouched."""
    from fedsim.config import PartitionConfig
    from fedsim.partition import label_histogram, partition

    data = generate("classification", N, "train", 2)
    labels = np.asarray(data["label"])
    parts = partition(labels, PartitionConfig(scheme="dirichlet", num_clients=10, alpha=0.5), seed=4)
    out = apply_scenarios(data, parts, {"missing": {"beta": 0.3}}, seed=4)
    has_image, has_text = _flags(out)
    assert abs((~has_image).mean() - 0.3) <= 0.03 and abs((~has_text).mean() - 0.3) <= 0.03
    assert abs((~has_image & ~has_text).mean() - 0.09) <= 0.02
    np.testing.assert_array_equal(label_histogram(np.asarray(out["label"]), parts, 4),
                                  label_histogram(labels, parts, 4))


def test_multilingual_translates_each_client_into_one_language(shards):
    from fedsim.data.languages import LANGUAGES

    data = generate("vqa", N, "train", 0)
    out = apply_scenarios(data, shards, {"multilingual": {}}, seed=3)
    assert out.features == features()
    english = set(data["question"])
    counts = {}
    for idx in shards:
        questions = set(out.select(idx)["question"])
        assert len(questions) == 1  # one language per client
        lang_is_english = questions <= english
        counts[lang_is_english] = counts.get(lang_is_english, 0) + 1
    # 10 clients over 4 languages in turns: 2 or 3 English clients.
    assert counts[True] in (2, 3) and counts[False] == 10 - counts[True] and len(LANGUAGES) == 4
    german = [i for i in range(N) if out[i]["question"].startswith("Welche Farbe")]
    row, src = out[german[0]], data[german[0]]
    colours = {"red": "rot", "orange": "orange", "yellow": "gelb", "green": "grün", "blue": "blau", "purple": "lila"}
    assert row["answer"] == colours[src["answer"]] and row["text"].startswith("die Notiz zeigt auf den")
    assert out["label"] == data["label"]


def test_multilingual_option_texts_and_letters(shards):
    data = generate("classification", N, "train", 0)
    out = apply_scenarios(data, shards, {"multilingual": {"languages": ["fr"]}}, seed=3)
    row = out[0]
    assert row["options"] == ["chaud fragile", "chaud solide", "froid fragile", "froid solide"]
    assert row["answer"] == data[0]["answer"] and row["question"] == "Quelle étiquette mettre sur le colis ?"
    assert " et " in row["text"] and "and" not in row["text"].split()


def test_domain_styles_per_client(shards):
    data = generate("classification", N, "train", 0)
    out = apply_scenarios(data, shards, {"domain": {"styles": ["clean", "invert"]}}, seed=3)
    inverted = 0
    for idx in shards:
        before = np.stack([np.asarray(data[int(i)]["image"], dtype=np.int16) for i in idx[:5]])
        after = np.stack([np.asarray(out[int(i)]["image"], dtype=np.int16) for i in idx[:5]])
        if np.array_equal(after, before):
            continue
        np.testing.assert_array_equal(after, 255 - before)
        inverted += 1
    assert inverted == 5  # two styles over 10 clients in turns
    for style in ("noise", "blur", "palette"):
        changed = apply_scenarios(data.select(range(300)), [np.arange(300)], {"domain": {"styles": [style]}}, seed=3)
        a, b = np.asarray(changed[0]["image"], dtype=float), np.asarray(data[0]["image"], dtype=float)
        assert a.shape == b.shape and np.abs(a - b).mean() > 2, style


@pytest.mark.parametrize("step", [{"multilingual": {}}, {"domain": {"styles": ["clean", "invert", "blur"]}}])
def test_per_client_styles_are_deterministic_by_seed(shards, step):
    data = generate("classification", 600, "train", 0)
    small = [s[s < 600] for s in shards]

    def signature(seed):
        out = apply_scenarios(data, small, step, seed=seed)
        return [(out[int(idx[0])]["question"], np.asarray(out[int(idx[0])]["image"]).tobytes()) for idx in small]

    assert signature(21) == signature(21)
    assert any(signature(21) != signature(s) for s in (22, 23, 24))
