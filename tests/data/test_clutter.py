"""``digits-clutter``: determinism, split by source image, shapes, classes, the placed digit, errors."""
import numpy as np
import pytest
import torch

from autosculpt.data import DATA_KINDS, DataSplits, get_dataset, parse_data_spec
from autosculpt.data.clutter import (
    DEFAULT_CONFIG,
    ClutterConfig,
    _cached_splits,
    _source_digits,
    load_clutter_splits,
    render_canvases,
    split_sources,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(n_train=300, n_val=120, n_test=150)  # quick splits for the property tests


@pytest.fixture(scope="module")
def digits():
    return _source_digits()


@pytest.fixture(scope="module")
def splits():
    return get_dataset("digits-clutter", 0)


def test_spec_is_built_in_and_takes_no_path():
    assert "digits-clutter" in DATA_KINDS
    assert parse_data_spec("digits-clutter") == ("digits-clutter", "")
    assert parse_data_spec("Digits-Clutter") == ("digits-clutter", "")
    with pytest.raises(ValueError, match="'digits-clutter' is built in and takes no path"):
        parse_data_spec("digits-clutter:foo")
    with pytest.raises(ValueError, match="unknown kind 'digits-clutterx'"):
        parse_data_spec("digits-clutterx")


def test_get_dataset_shapes_dtypes_labels(splits, digits):
    assert isinstance(splits, DataSplits)
    assert splits.num_classes == 10 and splits.input_shape == (1, 32, 32) and splits.spec == "digits-clutter"
    _, labels = digits
    sizes = (DEFAULT_CONFIG.n_train, DEFAULT_CONFIG.n_val, DEFAULT_CONFIG.n_test)
    for part, n in zip(splits, sizes):
        x, y = part.tensors
        assert x.shape == (n, 1, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
        assert y.shape == (n,) and y.dtype == torch.int64
        assert int(y.min()) >= 0 and int(y.max()) <= 9
        assert torch.isfinite(x).all()
        # The label is the class of the placed digit's source image; every class is in every split.
        assert np.array_equal(y.numpy(), labels[part.canvas_sources])
        assert sorted(set(y.tolist())) == list(range(10))
        counts = np.bincount(y.numpy(), minlength=10)
        assert counts.min() > 0.7 * n / 10  # roughly balanced, as the sources are
        img, lab = part[0]
        assert img.shape == (1, 32, 32) and int(lab) == int(y[0])
    # Standardised with the training split's statistics.
    xtr = splits.train.tensors[0]
    assert abs(float(xtr.mean())) < 1e-3 and abs(float(xtr.std()) - 1) < 1e-3


def test_splits_are_disjoint_by_source_image(splits, digits):
    srcs = [p.source_indices for p in splits]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not set(srcs[i]) & set(srcs[j])
    assert sorted(np.concatenate(srcs).tolist()) == list(range(len(digits[1])))
    for part in splits:
        allowed = set(part.source_indices.tolist())
        # The placed digit and every fragment come from this split's sources only ...
        assert set(part.canvas_sources.tolist()) <= allowed
        frag = part.fragment_sources
        assert frag.shape == (len(part), DEFAULT_CONFIG.fragments[1])
        assert set(frag[frag >= 0].tolist()) <= allowed
        # ... a fragment never from the placed digit's own image, and the counts within the setting.
        assert not (frag == part.canvas_sources[:, None]).any()
        counts = (frag >= 0).sum(1)
        assert counts.min() >= DEFAULT_CONFIG.fragments[0] and counts.max() <= DEFAULT_CONFIG.fragments[1]
        # Every source of the split is placed (the canvases cycle through them).
        assert set(part.canvas_sources.tolist()) == allowed
    # Each class is in each split's sources (stratified).
    for src in srcs:
        assert sorted(set(digits[1][src].tolist())) == list(range(10))


def test_deterministic_per_seed_and_cached_in_memory():
    a = load_clutter_splits(3, **SMALL)
    assert load_clutter_splits(3, **SMALL)[0].tensors[0] is a[0].tensors[0]  # in-memory cache
    _cached_splits.cache_clear()
    b = load_clutter_splits(3, **SMALL)
    assert b[0].tensors[0] is not a[0].tensors[0]
    for pa, pb in zip(a, b):
        assert torch.equal(pa.tensors[0], pb.tensors[0]) and torch.equal(pa.tensors[1], pb.tensors[1])
        assert np.array_equal(pa.source_indices, pb.source_indices)
        assert np.array_equal(pa.fragment_sources, pb.fragment_sources)


def test_different_seeds_differ():
    a, c = load_clutter_splits(3, **SMALL), load_clutter_splits(4, **SMALL)
    assert not np.array_equal(a[2].source_indices, c[2].source_indices)
    assert not torch.equal(a[0].tensors[0], c[0].tensors[0])


def test_split_sources_is_stratified_and_seeded(digits):
    _, labels = digits
    tr, va, te = split_sources(labels, 0, 0.15, 0.2)
    assert len(tr) + len(va) + len(te) == len(labels)
    assert abs(len(te) - 0.2 * len(labels)) < 12 and abs(len(va) - 0.15 * len(labels)) < 12
    assert np.array_equal(te, split_sources(labels, 0, 0.15, 0.2)[2])
    assert not np.array_equal(te, split_sources(labels, 1, 0.15, 0.2)[2])


def test_canvas_contains_the_placed_digit(digits):
    images, _ = digits
    sources = np.arange(200)
    cfg = ClutterConfig(noise=0.0)
    clean_cfg = ClutterConfig(noise=0.0, fragments=(0, 0))
    n = 400
    cluttered, target, frag = render_canvases(images, sources, n, np.random.default_rng(7), cfg)
    clean, target2, frag2 = render_canvases(images, sources, n, np.random.default_rng(7), clean_cfg)
    assert np.array_equal(target, target2) and frag2.shape == (n, 0)
    assert cluttered.dtype == np.float32 and cluttered.min() >= 0 and cluttered.max() <= 1
    # Clutter only adds ink (pixel-wise maximum): the placed digit is all there under it.
    assert (cluttered >= clean - 1e-6).all()
    assert (cluttered.sum((1, 2)) > clean.sum((1, 2)) + 1).mean() > 0.95
    # The clean canvas holds the whole digit: its ink is the source's, scaled by the drawn area
    # (scale 12..20 px for 8 source px) and intensity (0.7..1); nothing is cut off at the border.
    src_mass = images[sources[target]].sum((1, 2))
    ratio = clean.sum((1, 2)) / src_mass
    lo, hi = 0.7 * (12 / 8) ** 2, (20 / 8) ** 2
    assert (ratio > 0.95 * lo).all() and (ratio < 1.05 * hi).all()


def _ink_box(img, thr):
    """The image cropped to its ink and resized to 12×12, standardised (a crude shape descriptor)."""
    ys, xs = np.nonzero(img > thr)
    box = torch.from_numpy(np.ascontiguousarray(img[ys.min():ys.max() + 1, xs.min():xs.max() + 1]))[None, None]
    v = torch.nn.functional.interpolate(box, size=(12, 12), mode="bilinear", align_corners=False).ravel().numpy()
    return (v - v.mean()) / v.std()


def test_placed_digit_is_its_source(digits):
    """Unrotated and uncluttered, a canvas cropped to its ink matches its own source image's ink
    (nearest of 200 sources) and almost always a source of its class."""
    images, labels = digits
    sources = np.arange(200)
    clean, target, _ = render_canvases(images, sources, 100, np.random.default_rng(7),
                                       ClutterConfig(noise=0.0, fragments=(0, 0), rotation=0.0))
    cand = np.stack([_ink_box(images[s], 0.05) for s in sources])
    nearest = np.array([int(np.argmax(cand @ _ink_box(c, 0.05 * c.max()))) for c in clean])
    assert (nearest == target).mean() > 0.25  # chance: 0.005
    assert (labels[sources[nearest]] == labels[sources[target]]).mean() > 0.9


def test_noise_and_clutter_settings_take_effect(digits):
    images, _ = digits
    sources = np.arange(100)
    base, *_ = render_canvases(images, sources, 64, np.random.default_rng(1), ClutterConfig(noise=0.0))
    noisy, *_ = render_canvases(images, sources, 64, np.random.default_rng(1), ClutterConfig(noise=0.3))
    assert (noisy != base).mean() > 0.5
    more, _, frag = render_canvases(images, sources, 64, np.random.default_rng(1),
                                    ClutterConfig(noise=0.0, fragments=(8, 8)))
    assert (frag >= 0).all() and more.sum() > base.sum()


@pytest.mark.parametrize("bad, match", [
    (dict(fragments=(3, 1)), "fragments"),
    (dict(fragment_size=(0, 4)), "fragment_size"),
    (dict(scale=(20.0, 10.0)), "scale"),
    (dict(n_train=0), "n_train"),
    (dict(noise=-1.0), "noise"),
    (dict(canvas=4), "canvas"),
    (dict(val_fraction=0.5, test_fraction=0.45), "val_fraction"),
])
def test_bad_settings_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        load_clutter_splits(0, **bad)


def test_bad_seed_and_unknown_setting():
    with pytest.raises(ValueError, match="seed"):
        load_clutter_splits(-1)
    with pytest.raises(TypeError):
        load_clutter_splits(0, not_a_setting=1)


def test_large_generation_has_the_requested_sizes():
    # (speed is a benchmark matter: bench/digits_clutter_accuracy.py; ~3 s for 10k canvases on one core)
    _cached_splits.cache_clear()
    tr, _, _ = load_clutter_splits(5, n_train=10_000, n_val=100, n_test=100)
    assert len(tr) == 10_000
