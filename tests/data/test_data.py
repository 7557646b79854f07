"""Data loading: CIFAR pickle folders, image folders, digits, splits and clear errors.

The tests write tiny files in the real formats themselves (no downloads)."""
import os
import pickle

import numpy as np
import pytest
import torch

from autosculpt.data import DataSplits, get_dataset, parse_data_spec, stratified_split
from autosculpt.data.cifar import CIFAR_MEAN, CIFAR_STD


def write_cifar(root, kind="cifar10", n_per_batch=20, n_test=15, seed=0, str_keys=False):
    """Writes a CIFAR folder in the official python-pickle layout; returns the images and labels."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    label_key = "labels" if kind == "cifar10" else "fine_labels"
    classes = 10 if kind == "cifar10" else 100
    names = [f"data_batch_{i}" for i in range(1, 6)] if kind == "cifar10" else ["train"]
    written = {}
    for name in names + (["test_batch"] if kind == "cifar10" else ["test"]):
        n = n_test if "test" in name else n_per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, classes, size=n)]
        obj = {"data": data, label_key: labels} if str_keys else {b"data": data, label_key.encode(): labels}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(obj, f, protocol=2)
        written[name] = (data, labels)
    return written


def denorm(x):
    mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(3, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.uint8)


def test_parse_data_spec():
    assert parse_data_spec("digits") == ("digits", "")
    assert parse_data_spec("cifar10:/a/b") == ("cifar10", "/a/b")
    assert parse_data_spec("ImageFolder:/x:y") == ("imagefolder", "/x:y")
    with pytest.raises(ValueError, match="unknown kind 'mnist'"):
        parse_data_spec("mnist:/x")
    with pytest.raises(ValueError, match="needs a folder"):
        parse_data_spec("cifar10")


def test_stratified_split_is_seeded_disjoint_and_per_class():
    labels = np.repeat(np.arange(4), 25)
    rest, held = stratified_split(labels, 0.2, seed=3)
    assert len(set(rest) & set(held)) == 0 and len(rest) + len(held) == 100
    assert np.bincount(labels[held]).tolist() == [5, 5, 5, 5]
    rest2, held2 = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(held, held2)
    assert not np.array_equal(held, stratified_split(labels, 0.2, seed=4)[1])


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_folder_round_trip(tmp_path, kind):
    written = write_cifar(tmp_path / kind, kind, str_keys=(kind == "cifar100"))
    splits = get_dataset(f"{kind}:{tmp_path / kind}", seed=1, augment=False)
    assert isinstance(splits, DataSplits)
    train, val, test = splits
    n_train = 100 if kind == "cifar10" else 20
    assert len(train) + len(val) == n_train and len(val) > 0 and len(test) == 15
    assert splits.num_classes == (10 if kind == "cifar10" else 100)
    assert splits.input_shape == (3, 32, 32)
    # Test images decode exactly (channel-major 32×32 RGB), labels preserved in order.
    data, labels = written["test_batch" if kind == "cifar10" else "test"]
    for i in (0, 7, 14):
        x, y = test[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert torch.equal(denorm(x), torch.from_numpy(data[i].reshape(3, 32, 32)))
        assert int(y) == labels[i]
    # Train and val views are disjoint and together cover the training images.
    seen = sorted(int(j) for j in train.indices.tolist() + val.indices.tolist())
    assert seen == list(range(n_train))


def test_cifar_augmentation_changes_train_only(tmp_path):
    write_cifar(tmp_path / "c")
    train, val, _ = get_dataset(f"cifar10:{tmp_path / 'c'}", seed=0, augment=True)
    torch.manual_seed(0)
    xs = torch.stack([train[0][0] for _ in range(8)])
    assert not all(torch.equal(xs[0], x) for x in xs[1:])  # random crops / flips differ
    assert torch.equal(val[0][0], val[0][0])


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_dataset(f"cifar10:{tmp_path / 'nope'}")
    root = tmp_path / "c"
    write_cifar(root)
    os.remove(root / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        get_dataset(f"cifar10:{root}")
    write_cifar(root)
    (root / "data_batch_2").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="data_batch_2.*not a valid CIFAR"):
        get_dataset(f"cifar10:{root}")
    write_cifar(root)
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}, f)
    with pytest.raises(ValueError, match="expected uint8 \\(N, 3072\\)"):
        get_dataset(f"cifar10:{root}")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_pickle_cannot_run_code(tmp_path):
    root = tmp_path / "c"
    write_cifar(root)
    with open(root / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        get_dataset(f"cifar10:{root}")


def write_image_folder(root, classes=("cat", "dog", "eel"), per_class=6, size=(10, 12), seed=0, mode="RGB"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")


def test_image_folder_single_pool(tmp_path):
    write_image_folder(tmp_path / "imgs", per_class=10)
    splits = get_dataset(f"imagefolder:{tmp_path / 'imgs'}", seed=0, image_size=16)
    train, val, test = splits
    assert splits.num_classes == 3 and splits.input_shape == (3, 16, 16)
    assert len(train) + len(val) + len(test) == 30 and len(val) >= 3 and len(test) >= 3
    assert set(train.paths).isdisjoint(val.paths) and set(train.paths).isdisjoint(test.paths)
    x, y = test[0]
    assert x.shape == (3, 16, 16) and 0 <= int(y) < 3
    # Label = class folder index.
    for p, lab in zip(test.paths, test.labels.tolist()):
        assert os.path.basename(os.path.dirname(p)) == ["cat", "dog", "eel"][lab]
    # Normalised with training statistics: roughly zero-mean on training images.
    xs = torch.stack([train[i][0] for i in range(len(train))])
    assert abs(float(xs.mean())) < 0.3


def test_image_folder_train_test_layout_and_grayscale(tmp_path):
    write_image_folder(tmp_path / "d" / "train", classes=("a", "b"), per_class=5, mode="L")
    write_image_folder(tmp_path / "d" / "test", classes=("a", "b"), per_class=2, seed=1)
    train, val, test = get_dataset(f"imagefolder:{tmp_path / 'd'}", image_size=8)
    assert len(test) == 4 and len(train) + len(val) == 10
    assert train[0][0].shape == (3, 8, 8)  # grayscale converted to RGB


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_dataset(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        get_dataset(f"imagefolder:{tmp_path / 'empty'}")
    write_image_folder(tmp_path / "bad", per_class=4)
    (tmp_path / "bad" / "dog" / "9.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="9.png.*not a readable image"):
        get_dataset(f"imagefolder:{tmp_path / 'bad'}")
    write_image_folder(tmp_path / "half" / "train", per_class=2)
    with pytest.raises(ValueError, match="no test/ folder"):
        get_dataset(f"imagefolder:{tmp_path / 'half'}")


def test_digits_spec():
    splits = get_dataset("digits", seed=0)
    train, val, test = splits
    assert splits.num_classes == 10 and splits.input_shape == (1, 8, 8)
    assert len(train) + len(val) + len(test) == 1797
