"""mtt_lab.data: the bundled split, normalisation, sampling, ZCA and every on-disk dataset format.

The torchvision datasets are never downloaded: each test writes a few images in the dataset's real
on-disk format under ``tmp_path`` and loads them with ``download=False``.
"""

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from mtt_lab import data
from mtt_lab.data import (
    NORMALISATION,
    ZCA,
    DatasetUnavailable,
    ImageDataset,
    load_dataset,
    load_splits,
    mnist10k_split,
)


def raw_mnist10k():
    images, labels = data._mnist10k_arrays()
    return torch.from_numpy(images), torch.from_numpy(labels).long()


# ----------------------------------------------------------------------------------------------
# the bundled mnist10k


@pytest.mark.parametrize("split, n", [("train", 8000), ("test", 2000)])
def test_mnist10k_sizes_shapes_dtypes(split, n, mnist_train, mnist_test):
    ds = mnist_train if split == "train" else mnist_test
    assert len(ds) == n
    assert ds.images.shape == (n, 1, 28, 28)
    assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64
    assert ds.channels == 1 and ds.image_size == 28 and ds.num_classes == 10
    assert ds.class_names == [str(c) for c in range(10)]
    assert set(ds.labels.tolist()) == set(range(10))
    assert ds.name == "mnist10k" and ds.device == torch.device("cpu")


def test_mnist10k_split_is_stratified_disjoint_and_complete():
    _, labels = raw_mnist10k()
    train, test = mnist10k_split()
    assert len(train) == 8000 and len(test) == 2000
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(10_000))
    assert not set(train.tolist()) & set(test.tolist())
    for c in range(10):
        n_c = int((labels == c).sum())
        assert int((labels[test] == c).sum()) == round(0.2 * n_c)
        assert int((labels[train] == c).sum()) == n_c - round(0.2 * n_c)


def test_mnist10k_split_is_pinned():
    # Values computed when the split was fixed: any change of seed, fraction or order shows here.
    train, test = mnist10k_split()
    assert int(test.sum()) == 10_000_303
    assert int(train.sum()) == 39_994_697
    assert test[:10].tolist() == [8, 10, 11, 13, 31, 37, 39, 43, 51, 65]
    again_train, again_test = mnist10k_split()
    assert torch.equal(train, again_train) and torch.equal(test, again_test)


def test_mnist10k_labels_and_pixels_follow_the_split(mnist_train, mnist_test):
    images, labels = raw_mnist10k()
    train, test = mnist10k_split()
    for ds, index in ((mnist_train, train), (mnist_test, test)):
        assert torch.equal(ds.labels, labels[index])
        # denormalize undoes (x - mean) / std: back to the stored bytes / 255
        pixels = images[index].float().div(255).unsqueeze(1)
        torch.testing.assert_close(ds.denormalize(ds.images), pixels, atol=1e-6, rtol=0)


def test_mnist10k_normalisation(mnist_train):
    assert (mnist_train.mean, mnist_train.std) == NORMALISATION["mnist10k"]
    # The constants are the full 60k-image MNIST statistics; our 8000 training digits are a random
    # subset, so their mean differs only by sampling noise: the per-image mean pixel has a std of
    # about 0.044, i.e. a standard error of 0.044 / sqrt(8000) = 0.0005 in pixels, 0.0016 after
    # dividing by std 0.3081. 0.01 is about 6 standard errors; a wrong mean/std is off by >> 0.1.
    assert abs(mnist_train.images.mean().item()) < 0.01
    assert abs(mnist_train.images.std().item() - 1) < 0.02


def test_images_of_class(mnist_train):
    counts = mnist_train.class_counts()
    assert sum(counts) == 8000
    for c in (0, 5, 9):
        imgs = mnist_train.images_of_class(c)
        assert imgs.shape == (counts[c], 1, 28, 28)
        assert torch.equal(imgs, mnist_train.images[mnist_train.labels == c])
    with pytest.raises(ValueError, match="class 10 out of range"):
        mnist_train.images_of_class(10)
    with pytest.raises(ValueError, match="class -1 out of range"):
        mnist_train.images_of_class(-1)


def numbered_dataset(counts):
    """A dataset whose image i is the constant i, so sampled images name their own index."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    labels = labels[perm]
    images = torch.arange(len(labels), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    return ImageDataset("numbered", images, labels, [str(c) for c in range(len(counts))], (0.0,), (1.0,))


def test_sample_per_class_groups_distinct_images():
    ds = numbered_dataset([7, 5, 9])
    images, labels = ds.sample_per_class(4, torch.Generator().manual_seed(1))
    assert images.shape == (12, 1, 2, 2)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    index = images[:, 0, 0, 0].long()
    assert len(set(index.tolist())) == 12  # distinct images
    assert torch.equal(ds.labels[index], labels)  # each image carries its own label
    # k equal to the smallest class takes all of that class
    images, labels = ds.sample_per_class(5, torch.Generator().manual_seed(1))
    assert sorted(images[labels == 1, 0, 0, 0].long().tolist()) == sorted(torch.nonzero(ds.labels == 1).flatten().tolist())


def test_sample_per_class_is_reproducible(mnist_test):
    a = mnist_test.sample_per_class(10, torch.Generator().manual_seed(3))
    b = mnist_test.sample_per_class(10, torch.Generator().manual_seed(3))
    c = mnist_test.sample_per_class(10, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[1], c[1]) and not torch.equal(a[0], c[0])
    assert a[1].tolist() == [c for c in range(10) for _ in range(10)]


@pytest.mark.parametrize("k", [0, -2, 174])
def test_sample_per_class_rejects_bad_k(mnist_test, k):
    assert min(mnist_test.class_counts()) == 173
    with pytest.raises(ValueError, match=rf"k={k}\b.*at most 173"):
        mnist_test.sample_per_class(k, torch.Generator().manual_seed(0))


def test_bad_split_and_unknown_dataset_name_the_value():
    with pytest.raises(ValueError, match="'validation'"):
        load_dataset("mnist10k", "validation")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", "train")


def test_to_keeps_class_indexing(mnist_test):
    moved = mnist_test.to("cpu")
    assert moved is not mnist_test
    assert moved.class_counts() == mnist_test.class_counts()
    for c in range(10):
        assert torch.equal(moved.images_of_class(c), mnist_test.images_of_class(c))
    images, labels = moved.sample_per_class(3, torch.Generator().manual_seed(0))
    assert torch.equal(images, mnist_test.sample_per_class(3, torch.Generator().manual_seed(0))[0])


# ----------------------------------------------------------------------------------------------
# ZCA


def correlated(n=4000, shape=(3, 2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    d = int(np.prod(shape))
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing + 3.0
    return x.view(n, *shape)


def test_zca_whitens_to_identity_covariance():
    x = correlated()
    cov_x = torch.cov(x.flatten(1).T)
    assert (cov_x - torch.diag(cov_x.diag())).abs().max() > 1  # the input really is correlated
    zca = ZCA(eps=1e-12).fit(x)
    z = zca.transform(x)
    assert z.shape == x.shape and z.dtype == torch.float64
    flat = z.flatten(1)
    torch.testing.assert_close(flat.mean(0), torch.zeros(12, dtype=torch.float64), atol=1e-10, rtol=0)
    cov = flat.T @ flat / len(flat)  # the population covariance the fit uses
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), atol=1e-8, rtol=0)
    # ZCA (unlike PCA whitening) is the symmetric whitening matrix
    torch.testing.assert_close(zca.matrix, zca.matrix.T, atol=1e-10, rtol=0)


def test_zca_inverse_round_trip():
    x = correlated(n=500, seed=1)
    zca = ZCA(eps=0.1).fit(x)
    torch.testing.assert_close(zca.inverse(zca.transform(x)), x, atol=1e-10, rtol=0)
    x32 = x.float()
    z32 = zca.transform(x32)
    assert z32.dtype == torch.float32
    torch.testing.assert_close(zca.inverse(z32), x32, atol=1e-4, rtol=1e-5)


def test_zca_requires_fit():
    with pytest.raises(RuntimeError, match="fit"):
        ZCA().transform(torch.zeros(2, 1, 2, 2))


def test_whiten_then_denormalize_round_trip():
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(300, 3, 4, 4, generator=g)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    images = (pixels - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    ds = ImageDataset("toy", images, torch.arange(300) % 3, ["a", "b", "c"], mean, std)
    white = ds.whiten(ZCA(eps=0.01).fit(ds.images))
    assert white.zca is not None and ds.zca is None and ds.images is images  # the original is untouched
    assert not torch.allclose(white.images, images, atol=0.1)
    assert white.class_counts() == ds.class_counts() and torch.equal(white.labels, ds.labels)
    torch.testing.assert_close(white.denormalize(white.images), pixels, atol=1e-5, rtol=0)
    torch.testing.assert_close(ds.denormalize(ds.images), pixels, atol=1e-6, rtol=0)


def test_load_splits_zca_on_mnist10k():
    # One 784 x 784 eigendecomposition: about 2 s on 2 cores.
    images, _ = raw_mnist10k()
    train_idx, test_idx = mnist10k_split()
    train, test = load_splits("mnist10k", zca=True)
    assert train.zca is not None and test.zca is train.zca  # fitted on train, reused on test
    assert train.images.dtype == torch.float32 and train.images.shape == (8000, 1, 28, 28)
    plain = load_dataset("mnist10k", "train")
    assert not torch.allclose(train.images, plain.images, atol=0.1)
    for ds, index in ((train, train_idx), (test, test_idx)):
        pixels = images[index].float().div(255).unsqueeze(1)
        torch.testing.assert_close(ds.denormalize(ds.images), pixels, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# torchvision datasets in their on-disk formats


def random_uint8(shape, seed):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).numpy()


def write_idx(path, array):
    """The IDX format of the MNIST files: magic 0x0000 08 ndim, big-endian int32 dims, raw uint8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("name, folder, first_class", [
    ("mnist", "MNIST", "0 - zero"),
    ("fashion_mnist", "FashionMNIST", "T-shirt/top"),
])
def test_mnist_like_idx_files(tmp_path, name, folder, first_class):
    sets = {}
    for split, prefix, n, seed in (("train", "train", 12, 0), ("test", "t10k", 6, 1)):
        pixels = random_uint8((n, 28, 28), seed)
        labels = (np.arange(n) * 7 + seed) % 10
        write_idx(tmp_path / folder / "raw" / f"{prefix}-images-idx3-ubyte", pixels)
        write_idx(tmp_path / folder / "raw" / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
        sets[split] = pixels, labels
    for split, (pixels, labels) in sets.items():
        ds = load_dataset(name, split, root=tmp_path, download=False)
        assert ds.images.shape == (len(labels), 1, 28, 28) and ds.images.dtype == torch.float32
        assert ds.labels.tolist() == labels.tolist() and ds.labels.dtype == torch.int64
        assert len(ds.class_names) == 10 and ds.class_names[0] == first_class
        assert (ds.mean, ds.std) == NORMALISATION[name]
        torch.testing.assert_close(ds.denormalize(ds.images), torch.from_numpy(pixels).float().div(255).unsqueeze(1),
                                   atol=1e-6, rtol=0)


@pytest.fixture
def no_md5(monkeypatch):
    # torchvision checks the MD5 of the real CIFAR / SVHN files; ours are tiny stand-ins, so only
    # the checksum comparison is replaced: a missing file still fails the check.
    import torchvision.datasets.cifar
    import torchvision.datasets.svhn

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", exists)
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", exists)


def write_pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def cifar_rows(hwc):
    """[n, 32, 32, 3] -> the CIFAR row layout [n, 3072]: the R plane, then G, then B."""
    return np.ascontiguousarray(hwc.transpose(0, 3, 1, 2).reshape(len(hwc), -1))


def check_rgb(ds, hwc, labels):
    assert ds.images.shape == (len(labels), 3, 32, 32) and ds.channels == 3
    assert ds.labels.tolist() == list(labels) and ds.labels.dtype == torch.int64
    pixels = torch.from_numpy(hwc).permute(0, 3, 1, 2).float().div(255)
    torch.testing.assert_close(ds.denormalize(ds.images), pixels, atol=1e-6, rtol=0)


def test_cifar10_python_pickles(tmp_path, no_md5):
    base = tmp_path / "cifar-10-batches-py"
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    batches = []
    for b in range(1, 6):
        hwc, labels = random_uint8((2, 32, 32, 3), b), [b, (b + 3) % 10]
        write_pickle(base / f"data_batch_{b}", {"data": cifar_rows(hwc), "labels": labels})
        batches.append((hwc, labels))
    test_hwc, test_labels = random_uint8((3, 32, 32, 3), 9), [9, 0, 4]
    write_pickle(base / "test_batch", {"data": cifar_rows(test_hwc), "labels": test_labels})
    write_pickle(base / "batches.meta", {"label_names": names})

    train = load_dataset("cifar10", "train", root=tmp_path, download=False)
    check_rgb(train, np.concatenate([h for h, _ in batches]), [y for _, ys in batches for y in ys])
    assert train.class_names == names and train.mean == NORMALISATION["cifar10"][0]
    test = load_dataset("cifar10", "test", root=tmp_path, download=False)
    check_rgb(test, test_hwc, test_labels)


def test_cifar100_python_pickles(tmp_path, no_md5):
    base = tmp_path / "cifar-100-python"
    names = [f"class_{i:02d}" for i in range(100)]
    train_hwc, train_labels = random_uint8((4, 32, 32, 3), 0), [0, 99, 42, 7]
    test_hwc, test_labels = random_uint8((2, 32, 32, 3), 1), [55, 3]
    write_pickle(base / "train", {"data": cifar_rows(train_hwc), "fine_labels": train_labels,
                                  "coarse_labels": [0, 1, 2, 3]})
    write_pickle(base / "test", {"data": cifar_rows(test_hwc), "fine_labels": test_labels, "coarse_labels": [4, 5]})
    write_pickle(base / "meta", {"fine_label_names": names, "coarse_label_names": [f"c{i}" for i in range(20)]})

    train = load_dataset("cifar100", "train", root=tmp_path, download=False)
    check_rgb(train, train_hwc, train_labels)
    assert train.class_names == names and train.num_classes == 100
    check_rgb(load_dataset("cifar100", "test", root=tmp_path, download=False), test_hwc, test_labels)


def test_svhn_mat_files(tmp_path, no_md5):
    from scipy.io import savemat

    expected = {}
    for split, n, seed in (("train", 10, 0), ("test", 4, 1)):
        hwc = random_uint8((n, 32, 32, 3), seed)
        digits = np.arange(n) % 10
        y = np.where(digits == 0, 10, digits).reshape(n, 1).astype(np.uint8)  # SVHN writes 0 as 10
        savemat(tmp_path / f"{split}_32x32.mat", {"X": np.ascontiguousarray(hwc.transpose(1, 2, 3, 0)), "y": y})
        expected[split] = hwc, digits.tolist()
    train = load_dataset("svhn", "train", root=tmp_path, download=False)
    check_rgb(train, *expected["train"])
    assert train.num_classes == 10 and train.class_names == [str(c) for c in range(10)]
    test = load_dataset("svhn", "test", root=tmp_path, download=False)
    check_rgb(test, *expected["test"])
    assert test.num_classes == 10  # although this split only holds the digits 0..3


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn"])
def test_missing_torchvision_dataset_is_unavailable(tmp_path, name):
    root = tmp_path / "empty"
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset(name, "train", root=root, download=False)
    message = str(info.value)
    assert repr(name) in message and str(root) in message and "mnist10k" in message


def write_pngs(folder, classes, per_class, size, seed):
    from PIL import Image

    written = {}
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            rgb = random_uint8((size, size, 3), seed * 100 + c * 10 + i)
            Image.fromarray(rgb).save(folder / name / f"{i}.png")
            written[(name, i)] = rgb
    return written


def test_image_folder_with_train_and_test(tmp_path):
    classes = ["cat", "dog", "eel"]
    train_px = write_pngs(tmp_path / "train", classes, 3, 8, seed=0)
    test_px = write_pngs(tmp_path / "test", classes, 2, 8, seed=1)
    for split, written, per_class in (("train", train_px, 3), ("test", test_px, 2)):
        ds = load_dataset(f"folder:{tmp_path}", split, image_size=8)
        assert ds.class_names == classes and ds.channels == 3 and ds.image_size == 8
        assert ds.labels.tolist() == [c for c in range(3) for _ in range(per_class)]  # ImageFolder's sorted order
        expected = torch.stack([torch.from_numpy(written[(name, i)]) for name in classes for i in range(per_class)])
        # same size: PIL leaves the pixels as they are, and PNG is lossless
        torch.testing.assert_close(ds.denormalize(ds.images), expected.permute(0, 3, 1, 2).float().div(255),
                                   atol=1e-5, rtol=0)
        # both splits are normalised with the training split's statistics
        train_mean = torch.stack([torch.from_numpy(v) for v in train_px.values()]).float().div(255).mean((0, 1, 2))
        torch.testing.assert_close(torch.tensor(ds.mean), train_mean, atol=1e-5, rtol=0)
    train = load_dataset(f"folder:{tmp_path}", "train", image_size=8)
    torch.testing.assert_close(train.images.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_image_folder_without_a_test_split_needs_an_explicit_choice(tmp_path):
    write_pngs(tmp_path, ["a", "b"], 2, 12, seed=2)
    for split in ("train", "test"):  # never the training images as test images, silently
        with pytest.raises(DatasetUnavailable, match=r"no train/ and test/ .*holdout=0.2.*test=TEST_FOLDER"):
            load_dataset(f"folder:{tmp_path}", split)


def test_image_folder_holdout_is_stratified_disjoint_and_pinned(tmp_path):
    write_pngs(tmp_path, ["a", "b", "c"], 10, 8, seed=3)
    name = f"folder:{tmp_path}?holdout=0.3"
    train, test = load_dataset(name, "train"), load_dataset(name, "test")
    assert train.class_counts() == [7, 7, 7] and test.class_counts() == [3, 3, 3]
    rows = lambda ds: {tuple(x.flatten().tolist()) for x in ds.denormalize(ds.images)}  # noqa: E731
    assert not rows(train) & rows(test) and len(rows(train) | rows(test)) == 30
    again = load_dataset(name, "test")
    assert torch.equal(again.images, test.images)  # a fixed seed: the same held-out images every time
    with pytest.raises(ValueError, match=r"holdout must be a fraction in \(0, 1\), got 1.5"):
        load_dataset(f"folder:{tmp_path}?holdout=1.5")
    with pytest.raises(ValueError, match=r"unknown image-folder option 'hold'"):
        load_dataset(f"folder:{tmp_path}?hold=0.2")


def test_image_folder_with_a_named_test_folder(tmp_path):
    write_pngs(tmp_path / "mine", ["a", "b"], 3, 8, seed=4)
    written = write_pngs(tmp_path / "other", ["a", "b"], 2, 8, seed=5)
    name = f"folder:{tmp_path / 'mine'}?test={tmp_path / 'other'}"
    train, test = load_dataset(name, "train"), load_dataset(name, "test")
    assert len(train) == 6 and len(test) == 4
    expected = torch.stack([torch.from_numpy(written[(n, i)]) for n in "ab" for i in range(2)])
    torch.testing.assert_close(test.denormalize(test.images), expected.permute(0, 3, 1, 2).float().div(255),
                               atol=1e-5, rtol=0)


def test_image_folder_channels_and_size_follow_the_files(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(random_uint8((10, 10), i + 7 * (c == "b"))).save(tmp_path / split / c / f"{i}.png")
    ds = load_dataset(f"folder:{tmp_path}", "train")
    assert ds.images.shape == (4, 1, 10, 10)  # greyscale files: one channel, their own size, nothing converted
    assert load_dataset(f"folder:{tmp_path}?channels=3&size=8", "train").images.shape == (4, 3, 8, 8)
    # one colour image among greyscale ones, and one of another size: converted, with a warning each
    Image.fromarray(random_uint8((12, 12, 3), 9)).save(tmp_path / "train" / "a" / "2.png")
    with pytest.warns(UserWarning) as caught:
        ds = load_dataset(f"folder:{tmp_path}", "train")
    messages = " ".join(str(w.message) for w in caught)
    assert ds.images.shape == (5, 3, 10, 10)
    assert "4 greyscale images converted to RGB" in messages and "1 of 5 images resized to 10x10" in messages


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetUnavailable, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nowhere'}")
    (tmp_path / "empty" / "train" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "test" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetUnavailable, match="holds no images"):
        load_dataset(f"folder:{tmp_path / 'empty'}")
    write_pngs(tmp_path / "bad" / "train", ["a"], 1, 8, seed=6)
    write_pngs(tmp_path / "bad" / "test", ["a"], 1, 8, seed=7)
    (tmp_path / "bad" / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DatasetUnavailable, match=r"broken.png: expected an image file, found a damaged"):
        load_dataset(f"folder:{tmp_path / 'bad'}")
