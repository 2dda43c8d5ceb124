"""Datasets held whole as tensors on one device.

Every split is loaded once into an :class:`ImageDataset`: ``images`` is a normalised float32
tensor ``[n, c, h, w]`` and ``labels`` an int64 tensor ``[n]``, both on the chosen device. Training
loops index these tensors with random permutations, so there is no per-sample Python, no
``DataLoader`` and no worker process anywhere in the package.

Datasets (``load_dataset(name, ...)``):

* ``mnist10k`` (default, offline): 10,000 real MNIST digits bundled with the package, split
  8,000 / 2,000 per class with a fixed seed.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``, ``svhn``: the torchvision datasets,
  downloaded on first use into ``root`` (default ``$MTT_LAB_DATA`` or ``~/.cache/mtt_lab``).
* ``folder:PATH``: an ImageFolder tree ``PATH/train/<class>/*.png`` and ``PATH/test/<class>/*``.
  A tree without those two needs an explicit test split, written into the name so that it is
  recorded with every store: ``folder:PATH?holdout=0.2`` (a stratified 20 % of every class, fixed
  seed) or ``folder:PATH?test=OTHER`` (a named test tree). Channels and size follow the files
  (greyscale files give 1 channel, colour files 3; the most common size is kept and others are
  resized, with a warning that says so) unless the name asks otherwise: ``?size=32&channels=3``.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import torch
from torch import Tensor

from .files import FileError

DATASETS = ("mnist10k", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "folder:PATH")

# Per-channel mean / std of the training images in [0, 1] (the values the field uses).
NORMALISATION = {
    "mnist10k": ((0.1307,), (0.3081,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2861,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}

MNIST10K_SPLIT_SEED = 0
MNIST10K_TEST_FRACTION = 0.2
OFFLINE_HINT = "use the bundled offline dataset instead: load_dataset('mnist10k') / --dataset mnist10k"


class DatasetUnavailable(FileError):
    """A dataset could not be found on disk nor downloaded, or its files cannot be read."""


@dataclass
class ImageDataset:
    """One split of a dataset, held whole on one device.

    images: float32 ``[n, channels, size, size]``, normalised by ``mean`` / ``std`` (per channel)
    labels: int64 ``[n]`` in ``[0, num_classes)``
    """

    name: str
    images: Tensor
    labels: Tensor
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    zca: ZCA | None = None  # set by whiten(); denormalize() undoes it first
    _class_index: list[Tensor] = field(default=None, repr=False)

    def __post_init__(self):
        if self._class_index is None:
            self._class_index = [
                torch.nonzero(self.labels == c).flatten() for c in range(self.num_classes)
            ]

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device) -> ImageDataset:
        """A copy of this split on ``device``."""
        return replace(
            self,
            images=self.images.to(device),
            labels=self.labels.to(device),
            _class_index=[i.to(device) for i in self._class_index],
        )

    def whiten(self, zca: ZCA) -> ImageDataset:
        """A copy with ZCA-whitened images (fit ``zca`` on the training split, reuse it on test)."""
        return replace(self, images=zca.transform(self.images), zca=zca)

    def denormalize(self, images: Tensor) -> Tensor:
        """Model-space images ``[n, c, h, w]`` -> pixel values in ``[0, 1]`` for display."""
        if self.zca is not None:
            images = self.zca.inverse(images)
        mean = torch.tensor(self.mean, device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(-1, 1, 1)
        return (images * std + mean).clamp(0, 1)

    def class_counts(self) -> list[int]:
        return [len(i) for i in self._class_index]

    def images_of_class(self, c: int) -> Tensor:
        """All images of class ``c``: ``[n_c, channels, size, size]``."""
        if not 0 <= c < self.num_classes:
            raise ValueError(f"class {c} out of range: {self.name} has classes 0..{self.num_classes - 1}")
        return self.images[self._class_index[c]]

    def sample_per_class(self, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``k`` distinct random images of every class, grouped by class.

        Returns images ``[num_classes * k, c, h, w]`` and labels ``[num_classes * k]``
        (``0 0 .. 0 1 1 .. 1 ...``). ``generator`` is a CPU ``torch.Generator``.
        """
        smallest = min(self.class_counts())
        if not 1 <= k <= smallest:
            raise ValueError(
                f"cannot sample k={k} images per class: {self.name} has at least 1 and at most "
                f"{smallest} images in its smallest class"
            )
        picks = []
        for index in self._class_index:
            order = torch.randperm(len(index), generator=generator)[:k]
            picks.append(index[order.to(index.device)])
        picks = torch.cat(picks)
        return self.images[picks], self.labels[picks]


# ----------------------------------------------------------------------------------------------
# Loading


def default_root() -> Path:
    return Path(os.environ.get("MTT_LAB_DATA", Path.home() / ".cache" / "mtt_lab"))


def load_dataset(
    name: str = "mnist10k",
    split: str = "train",
    root: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    download: bool = True,
    image_size: int | None = None,
) -> ImageDataset:
    """Load one split of a dataset as an :class:`ImageDataset` on ``device``.

    name: one of ``DATASETS``; split: ``"train"`` or ``"test"``; root: where torchvision datasets
    live (downloaded there when ``download``); image_size: side length for ``folder:PATH`` only
    (default: the files' own size; the same as ``?size=N`` in the name).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else default_root()
    if name == "mnist10k":
        images, labels, classes = _load_mnist10k(split)
    elif name.startswith("folder:"):
        images, labels, classes = _load_folder(name, split, image_size)
    elif name in _TORCHVISION:
        images, labels, classes = _load_torchvision(name, split, root, download)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name in NORMALISATION:
        mean, std = NORMALISATION[name]
    else:  # image folders: statistics of the training split, for both splits
        stats = images if split == "train" else _load_folder(name, "train", image_size)[0]
        mean = tuple(stats.mean(dim=(0, 2, 3)).tolist())
        std = tuple(stats.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    # x_normalised = (x - mean_c) / std_c, per channel c
    images = (images - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    return ImageDataset(name, images.contiguous(), labels.long(), list(classes), mean, std).to(device)


def mnist10k_split() -> tuple[Tensor, Tensor]:
    """Indices (into the bundled 10,000 digits) of the fixed train and test splits.

    Class-stratified: for each class, a permutation drawn from ``torch.Generator`` seeded with
    ``MNIST10K_SPLIT_SEED`` sends the first ``round(0.2 * n_c)`` images to test (2,000 in all).
    """
    labels = torch.from_numpy(_mnist10k_arrays()[1]).long()
    generator = torch.Generator().manual_seed(MNIST10K_SPLIT_SEED)
    train, test = [], []
    for c in range(10):
        index = torch.nonzero(labels == c).flatten()
        index = index[torch.randperm(len(index), generator=generator)]
        n_test = round(MNIST10K_TEST_FRACTION * len(index))
        test.append(index[:n_test])
        train.append(index[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _mnist10k_arrays() -> tuple[np.ndarray, np.ndarray]:
    with resources.files("mtt_lab").joinpath("datasets/mnist_10k.npz").open("rb") as f:
        arrays = np.load(f)
        return arrays["images"], arrays["labels"]


def _load_mnist10k(split: str):
    images, labels = _mnist10k_arrays()
    train, test = mnist10k_split()
    index = train if split == "train" else test
    images = torch.from_numpy(images)[index].float().div(255).unsqueeze(1)  # [n, 1, 28, 28]
    return images, torch.from_numpy(labels)[index], [str(c) for c in range(10)]


_TORCHVISION = {
    # name: (torchvision class name, how to pick the split)
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "svhn": "SVHN",
}


def _load_torchvision(name: str, split: str, root: Path, download: bool):
    import torchvision.datasets as tvd

    cls = getattr(tvd, _TORCHVISION[name])
    split_kw = {"split": split} if name == "svhn" else {"train": split == "train"}
    try:
        ds = cls(str(root), download=False, **split_kw)
    except (RuntimeError, FileNotFoundError, OSError) as missing:
        if not download:
            raise DatasetUnavailable(
                f"dataset {name!r} ({split}) was not found under {root} and download=False; "
                f"{OFFLINE_HINT}"
            ) from missing
        try:
            ds = cls(str(root), download=True, **split_kw)
        except Exception as exc:  # no network, proxy, checksum: all mean the same to the user
            raise DatasetUnavailable(
                f"dataset {name!r} ({split}) is not under {root} and could not be downloaded "
                f"({type(exc).__name__}: {exc}); {OFFLINE_HINT}, or put the files under {root}"
            ) from exc
    data = torch.as_tensor(np.asarray(ds.data))
    if data.ndim == 3:  # MNIST-like: [n, h, w] uint8
        images = data.unsqueeze(1)
    elif name == "svhn":  # [n, c, h, w] already
        images = data
    else:  # CIFAR: [n, h, w, c]
        images = data.permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(ds.labels if name == "svhn" else ds.targets))
    # SVHN has no .classes: its ten digits, whatever labels this split happens to hold
    classes = getattr(ds, "classes", None) or [str(c) for c in range(10)]
    return images.float().div(255), labels, classes


FOLDER_OPTIONS = {"holdout": float, "test": str, "size": int, "channels": int}
HOLDOUT_SEED = 0


def parse_folder_name(name: str) -> tuple[Path, dict]:
    """``"folder:PATH?holdout=0.2&size=32"`` -> ``(Path("PATH"), {"holdout": 0.2, "size": 32})``."""
    path, _, query = name[len("folder:"):].partition("?")
    options = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in FOLDER_OPTIONS:
            raise ValueError(f"unknown image-folder option {key!r} in {name!r}; allowed: {', '.join(FOLDER_OPTIONS)}")
        try:
            options[key] = FOLDER_OPTIONS[key](value)
        except ValueError:
            raise ValueError(f"image-folder option {key}={value!r} in {name!r} is not a {FOLDER_OPTIONS[key].__name__}"
                             ) from None
    if "holdout" in options and not 0 < options["holdout"] < 1:
        raise ValueError(f"holdout must be a fraction in (0, 1), got {options['holdout']} in {name!r}")
    if "holdout" in options and "test" in options:
        raise ValueError(f"{name!r}: give either holdout=FRACTION or test=FOLDER, not both")
    if options.get("channels", 1) not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {options['channels']} in {name!r}")
    if options.get("size", 8) < 8:
        raise ValueError(f"size must be >= 8 pixels, got {options['size']} in {name!r}")
    return Path(path), options


def _load_folder(name: str, split: str, image_size: int | None):
    """One split of an image folder as ``(images [n, c, s, s] in [0, 1], labels [n], class names)``."""
    root, options = parse_folder_name(name)
    if image_size is not None and options.setdefault("size", image_size) != image_size:
        raise ValueError(f"image_size={image_size} contradicts size={options['size']} in {name!r}")
    if not root.is_dir():
        raise DatasetUnavailable(f"image folder {str(root)!r} does not exist; check the path, or {OFFLINE_HINT}")
    has_splits = (root / "train").is_dir() and (root / "test").is_dir()
    if "test" in options:
        tree = root if split == "train" else Path(options["test"])
    elif "holdout" in options:
        tree = root
    elif has_splits:
        tree = root / split
    else:
        raise DatasetUnavailable(
            f"image folder {str(root)!r} has no train/ and test/ subfolders, and its training images must not "
            f"double as test images; name a test split: folder:{root}?holdout=0.2 (a held-out 20 % of each class, "
            f"fixed seed) or folder:{root}?test=TEST_FOLDER")
    files, labels, classes = _image_files(tree)
    if "holdout" in options:
        files, labels = _holdout(files, labels, len(classes), options["holdout"], split, root)
    images = _decode(files, options.get("channels"), options.get("size"), f"{root} ({split})")
    return images, torch.tensor(labels), classes


def _image_files(tree: Path) -> tuple[list[Path], list[int], list[str]]:
    """The image files of ``tree/<class>/`` and their class indices (classes sorted by name)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not tree.is_dir():
        raise DatasetUnavailable(f"image folder {str(tree)!r} does not exist; check the path")
    classes = sorted(d.name for d in tree.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for c, name in enumerate(classes):
        found = sorted(f for f in (tree / name).rglob("*") if f.suffix.lower() in IMG_EXTENSIONS and f.is_file())
        files += found
        labels += [c] * len(found)
    if not files:
        raise DatasetUnavailable(f"image folder {str(tree)!r} holds no images: expected {tree}/<class>/<image> "
                                 f"files ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
    return files, labels, classes


def _holdout(files, labels, num_classes: int, fraction: float, split: str, root: Path):
    """A stratified split: per class, a fixed-seed permutation sends the first round(fraction * n_c) to test."""
    generator = torch.Generator().manual_seed(HOLDOUT_SEED)
    chosen = []
    for c in range(num_classes):
        index = [i for i, label in enumerate(labels) if label == c]
        order = [index[i] for i in torch.randperm(len(index), generator=generator)]
        n_test = round(fraction * len(index))
        if not 1 <= n_test < len(index):
            raise DatasetUnavailable(f"image folder {str(root)!r}: class {c} has {len(index)} images, too few to "
                                     f"hold out {fraction:g} of them for testing (need at least one of each)")
        chosen += order[:n_test] if split == "test" else order[n_test:]
    chosen.sort()
    return [files[i] for i in chosen], [labels[i] for i in chosen]


def _decode(files: list[Path], channels: int | None, size: int | None, where: str) -> Tensor:
    """Decode every file once: ``[n, channels, size, size]`` in [0, 1]. Unless asked, channels and size
    follow the files (1 channel if all are greyscale, else 3; the most common size), with a warning
    for every conversion that this choice forces."""
    from PIL import Image, UnidentifiedImageError

    decoded = []
    for file in files:
        try:
            with Image.open(file) as img:
                img.load()
                decoded.append(img.copy())
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise DatasetUnavailable(f"{file}: expected an image file, found a damaged or unknown file "
                                     f"({type(exc).__name__}); remove or replace it") from exc
    grey = [img.mode in ("1", "L", "I", "I;16", "F") for img in decoded]
    if channels is None:  # follow the files, and say what had to be converted
        channels = 1 if all(grey) else 3
        if any(grey) and not all(grey):
            warnings.warn(f"image folder {where}: {sum(grey)} greyscale images converted to RGB", stacklevel=4)
    sizes = Counter(img.size for img in decoded)
    if size is None:
        (width, height), _ = sizes.most_common(1)[0]
        if width != height:
            raise DatasetUnavailable(f"image folder {where}: most images are {width}x{height}, not square; "
                                     f"name a size to resize them to, e.g. ?size=32")
        size = width
        resized = sum(n for s, n in sizes.items() if s != (size, size))
        if resized:
            warnings.warn(f"image folder {where}: {resized} of {len(decoded)} images resized to {size}x{size}",
                          stacklevel=4)
    pixels = []
    for img in decoded:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        array = torch.from_numpy(np.asarray(img).copy())
        pixels.append(array.unsqueeze(-1) if channels == 1 else array)
    return torch.stack(pixels).permute(0, 3, 1, 2).float().div(255)


# ----------------------------------------------------------------------------------------------
# ZCA whitening


class ZCA:
    """ZCA whitening of flattened images, fitted on a training set and exactly invertible.

    With X ``[n, d]`` the flattened images, mean mu and covariance C = U diag(lam) U^T:
    W = U diag(1 / sqrt(lam + eps)) U^T, z = (x - mu) W and x = z W^-1 + mu. ``eps``
    regularises small eigenvalues (MTT whitens CIFAR with eps = 0.1).
    """

    def __init__(self, eps: float = 0.1):
        self.eps = eps
        self.mean = self.matrix = self.inverse_matrix = None

    def fit(self, images: Tensor) -> ZCA:
        """images: ``[n, c, h, w]``; the transform is fitted in float64 for accuracy."""
        x = images.flatten(1).double()
        self.mean = x.mean(dim=0)
        x = x - self.mean
        # C = X^T X / n = U diag(lam) U^T
        lam, u = torch.linalg.eigh(x.T @ x / x.shape[0])
        lam = lam.clamp_min(0)
        self.matrix = (u * (lam + self.eps).rsqrt()) @ u.T
        self.inverse_matrix = (u * (lam + self.eps).sqrt()) @ u.T
        return self

    def _apply(self, images: Tensor, matrix: Tensor, shift: Tensor, forward: bool) -> Tensor:
        if matrix is None:
            raise RuntimeError("ZCA.fit must be called before transforming images")
        flat = images.flatten(1).double()
        matrix, shift = matrix.to(flat.device), shift.to(flat.device)
        out = (flat - shift) @ matrix if forward else flat @ matrix + shift
        return out.to(images.dtype).view_as(images)

    def transform(self, images: Tensor) -> Tensor:
        """``[n, c, h, w]`` -> whitened ``[n, c, h, w]``."""
        return self._apply(images, self.matrix, self.mean, forward=True)

    def inverse(self, images: Tensor) -> Tensor:
        """Whitened ``[n, c, h, w]`` -> the original pixel space."""
        return self._apply(images, self.inverse_matrix, self.mean, forward=False)


def load_splits(name: str = "mnist10k", zca: bool = False, device="cpu", root=None) -> tuple[ImageDataset, ImageDataset]:
    """Train and test splits of ``name``; with ``zca``, both whitened by a ZCA fitted on train."""
    train = load_dataset(name, "train", root=root, device=device)
    test = load_dataset(name, "test", root=root, device=device)
    if zca:
        whitening = ZCA().fit(train.images)
        train, test = train.whiten(whitening), test.whiten(whitening)
    return train, test
