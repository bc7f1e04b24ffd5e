"""Digits-Five: MNIST, USPS, SVHN, MNIST-M and SynthDigits (10 digit classes).

On-disk formats (see docs/datasets.md, section digits-five):

- mnist: torchvision's ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``;
- svhn: torchvision's ``SVHN/{train,test}_32x32.mat`` (read with scipy.io);
- usps: torchvision's ``USPS/usps.bz2`` and ``USPS/usps.t.bz2`` (libsvm text);
- mnistm, syn (and any of the above as a fallback): the FedBN release,
  ``<Folder>/partitions/train_part{0..9}.pkl`` + ``<Folder>/test.pkl``, each a pickle of
  ``(images uint8 [N, H, W(, 3)], labels)``. Pickles are only opened with
  ``options.allow_pickle: true``; the safe equivalent ``<Folder>/{train,test}.npz``
  (arrays ``images``, ``labels``) is always accepted and preferred.

The official train/test splits are used. ``options.train_parts: k`` keeps the first k of
FedBN's 10 training partitions (FedBN's default experiment uses k = 1, i.e. 10 %).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedsim.data.base import DATASETS, DomainSplit, MultiDomainDataset
from fedsim.data.config import DataConfig
from fedsim.data.loaders._files import DataSource, Options, download_error, resolve_root, select_domains, to_rgb_uint8
from fedsim.schema import ScenarioError

NAME = "digits-five"
DOMAINS = ("mnist", "usps", "svhn", "mnistm", "syn")
FOLDERS = {"mnist": "MNIST", "usps": "USPS", "svhn": "SVHN", "mnistm": "MNIST_M", "syn": "SynthDigits"}
CLASS_NAMES = [str(d) for d in range(10)]
FEDBN_URL = "https://github.com/med-air/FedBN (digit_dataset.zip)"
FEDBN_PARTS = 10

SOURCES = {
    "mnist": DataSource(
        f"{NAME} (mnist)",
        "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (torchvision MNIST) or MNIST/{train,test}.npz",
        "http://yann.lecun.com/exdb/mnist/ (or data.download: true)",
    ),
    "usps": DataSource(
        f"{NAME} (usps)",
        "USPS/usps.bz2 and USPS/usps.t.bz2 (torchvision USPS) or USPS/{train,test}.npz",
        "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass.html#usps (or data.download: true)",
    ),
    "svhn": DataSource(
        f"{NAME} (svhn)",
        "SVHN/train_32x32.mat and SVHN/test_32x32.mat (torchvision SVHN) or SVHN/{train,test}.npz",
        "http://ufldl.stanford.edu/housenumbers/ (or data.download: true)",
    ),
    "mnistm": DataSource(
        f"{NAME} (mnistm)",
        "MNIST_M/{train,test}.npz (arrays images, labels) or FedBN's MNIST_M/partitions/train_part{0..9}.pkl + MNIST_M/test.pkl",
        FEDBN_URL,
    ),
    "syn": DataSource(
        f"{NAME} (syn)",
        "SynthDigits/{train,test}.npz (arrays images, labels) or FedBN's SynthDigits/partitions/train_part{0..9}.pkl + SynthDigits/test.pkl",
        FEDBN_URL,
    ),
}
ROOT_SOURCE = DataSource(
    NAME,
    "<root>/{MNIST/raw, USPS, SVHN, MNIST_M, SynthDigits} (see docs/datasets.md#digits-five)",
    "torchvision (MNIST, USPS, SVHN with data.download: true) and " + FEDBN_URL,
)

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test


# --------------------------------------------------------------------------------------
# FedBN's format: npz (safe) or pickled partitions (opt-in)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        if "images" not in data or "labels" not in data:
            raise ScenarioError(f"data.root: {path}: expected arrays 'images' and 'labels', found {sorted(data.files)}")
        return np.asarray(data["images"]), np.asarray(data["labels"])


def _read_fedbn_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # Opt-in only (options.allow_pickle): FedBN's files are plain pickles of (images, labels).
    obj = np.load(path, allow_pickle=True)
    images, labels = obj[0], obj[1]
    return np.asarray(images), np.asarray(labels)


def _has_fedbn(folder: Path) -> bool:
    return (folder / "train.npz").is_file() or (folder / "partitions" / "train_part0.pkl").is_file()


def _load_fedbn(domain: str, folder: Path, allow_pickle: bool, train_parts: int | None) -> Arrays:
    source = SOURCES[domain]
    if (folder / "train.npz").is_file():
        if not (folder / "test.npz").is_file():
            raise source.not_found(folder / "test.npz")
        x_train, y_train = _read_npz(folder / "train.npz")
        x_test, y_test = _read_npz(folder / "test.npz")
        if train_parts is not None:
            keep = math.ceil(len(x_train) * train_parts / FEDBN_PARTS)
            x_train, y_train = x_train[:keep], y_train[:keep]
        return x_train, y_train, x_test, y_test
    parts_dir = folder / "partitions"
    if not (parts_dir / "train_part0.pkl").is_file():
        raise source.not_found(folder / "train.npz")
    if not allow_pickle:
        raise ScenarioError(
            f"data.options.allow_pickle: {NAME} domain {domain} is only in FedBN's pickle format ({parts_dir}); "
            "unpickling can run arbitrary code, so set data.options.allow_pickle: true if you trust these files, "
            "or convert them once to train.npz/test.npz (docs/datasets.md#digits-five)"
        )
    n_parts = train_parts if train_parts is not None else FEDBN_PARTS
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for part in range(n_parts):
        path = parts_dir / f"train_part{part}.pkl"
        if not path.is_file():
            if train_parts is None and part > 0:
                break  # fewer partitions than FedBN's 10: use what is there
            raise source.not_found(path)
        x, y = _read_fedbn_pickle(path)
        xs.append(x)
        ys.append(y)
    if not (folder / "test.pkl").is_file():
        raise source.not_found(folder / "test.pkl")
    x_test, y_test = _read_fedbn_pickle(folder / "test.pkl")
    return np.concatenate(xs), np.concatenate(ys), x_test, y_test


# --------------------------------------------------------------------------------------
# torchvision formats


def _first_parts(arrays: Arrays, train_parts: int | None) -> Arrays:
    if train_parts is None:
        return arrays
    x_train, y_train, x_test, y_test = arrays
    keep = math.ceil(len(x_train) * train_parts / FEDBN_PARTS)
    return x_train[:keep], y_train[:keep], x_test, y_test


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _load_mnist(root: Path, download: bool) -> Arrays | None:
    from torchvision.datasets import MNIST
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw = root / "MNIST" / "raw"
    if not all((raw / f).is_file() for f in MNIST_FILES):
        if not download:
            return None
        try:
            MNIST(str(root), train=True, download=True)
        except Exception as exc:  # network or checksum errors from torchvision
            raise download_error("MNIST", "torchvision MNIST mirrors", exc) from None
    x_train = read_image_file(str(raw / MNIST_FILES[0])).numpy()
    y_train = read_label_file(str(raw / MNIST_FILES[1])).numpy()
    x_test = read_image_file(str(raw / MNIST_FILES[2])).numpy()
    y_test = read_label_file(str(raw / MNIST_FILES[3])).numpy()
    return x_train, y_train, x_test, y_test


def _load_usps(root: Path, download: bool) -> Arrays | None:
    from torchvision.datasets import USPS

    folder = root / "USPS"
    files = [folder / USPS.split_list[s][1] for s in ("train", "test")]
    if not all(f.is_file() for f in files):
        if not download:
            return None
        for split in ("train", "test"):
            try:
                USPS(str(folder), train=split == "train", download=True)
            except Exception as exc:
                raise download_error("USPS", USPS.split_list[split][0], exc) from None
    out: list[np.ndarray] = []
    for train in (True, False):
        try:
            ds = USPS(str(folder), train=train, download=False)
        except (OSError, ValueError, EOFError) as exc:
            raise ScenarioError(f"data.root: {files[0 if train else 1]}: not a USPS bz2 libsvm file ({exc})") from None
        out += [np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)]
    return out[0], out[1], out[2], out[3]


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        import scipy.io as sio
    except ImportError:
        raise ScenarioError(
            f"data.root: {path}: reading SVHN .mat files needs scipy (pip install scipy), "
            f"or convert to SVHN/{{train,test}}.npz"
        ) from None
    mat = sio.loadmat(str(path))
    x = np.transpose(mat["X"], (3, 0, 1, 2))  # [32, 32, 3, N] -> [N, 32, 32, 3]
    y = mat["y"].astype(np.int64).squeeze(1) % 10  # SVHN labels the digit 0 as 10
    return np.ascontiguousarray(x, dtype=np.uint8), y


def _load_svhn(root: Path, download: bool) -> Arrays | None:
    from torchvision.datasets import SVHN
    from torchvision.datasets.utils import download_url

    folder = root / "SVHN"
    files = {s: folder / SVHN.split_list[s][1] for s in ("train", "test")}
    if not all(f.is_file() for f in files.values()):
        if not download:
            return None
        for split, path in files.items():
            if path.is_file():
                continue
            url, filename, md5 = SVHN.split_list[split]
            try:
                download_url(url, str(folder), filename, md5)
            except Exception as exc:
                raise download_error("SVHN", url, exc) from None
    x_train, y_train = _read_svhn_mat(files["train"])
    x_test, y_test = _read_svhn_mat(files["test"])
    return x_train, y_train, x_test, y_test


TORCHVISION_LOADERS: dict[str, Callable[[Path, bool], Arrays | None]] = {
    "mnist": _load_mnist,
    "usps": _load_usps,
    "svhn": _load_svhn,
}


def load_domain_arrays(root: Path, domain: str, download: bool, allow_pickle: bool, train_parts: int | None) -> Arrays:
    """One domain at native resolution: (x_train, y_train, x_test, y_test)."""
    folder = root / FOLDERS[domain]
    reader = TORCHVISION_LOADERS.get(domain)
    if reader is not None:
        # torchvision's files win; FedBN's format is the fallback (download only if neither).
        arrays = reader(root, download and not _has_fedbn(folder))
        if arrays is not None:
            return _first_parts(arrays, train_parts)
        if not _has_fedbn(folder):
            raise SOURCES[domain].not_found(folder)
    elif not folder.is_dir():
        raise SOURCES[domain].not_found(folder)
    return _load_fedbn(domain, folder, allow_pickle, train_parts)


def _labels(y: np.ndarray, domain: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if y.size and (y.min() < 0 or y.max() > 9):
        raise ScenarioError(f"data.root: {NAME} domain {domain}: labels must be digits 0..9, got {y.min()}..{y.max()}")
    return y


@DATASETS.register(NAME)
def load_digits_five(cfg: DataConfig) -> MultiDomainDataset:
    """Digits-Five from disk (see module docstring); images uint8 [N, S, S, 3]."""
    opts = Options(NAME, cfg.options, ["allow_pickle", "train_parts"])
    allow_pickle = opts.bool("allow_pickle", False)
    train_parts = opts.int("train_parts", None, 1, FEDBN_PARTS)
    domains = select_domains(NAME, DOMAINS, cfg.domains)
    root = resolve_root(cfg, NAME, ROOT_SOURCE)
    splits: dict[str, DomainSplit] = {}
    for domain in domains:
        x_train, y_train, x_test, y_test = load_domain_arrays(root, domain, cfg.download, allow_pickle, train_parts)
        if len(x_train) != len(y_train) or len(x_test) != len(y_test):
            raise ScenarioError(f"data.root: {NAME} domain {domain}: images and labels differ in length")
        splits[domain] = DomainSplit(
            x_train=to_rgb_uint8(x_train, cfg.image_size),
            y_train=_labels(y_train, domain),
            x_test=to_rgb_uint8(x_test, cfg.image_size),
            y_test=_labels(y_test, domain),
        )
    parts = "all training data" if train_parts is None else f"first {train_parts}/10 of each training set"
    return MultiDomainDataset(
        name=NAME,
        domains=splits,
        num_classes=10,
        image_size=cfg.image_size,
        class_names=list(CLASS_NAMES),
        notes=f"official train/test splits; {parts}; root {root}",
    )
