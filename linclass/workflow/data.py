"""Datasets for the classifiers: CIFAR-10, any image folder, and scikit-learn's digits.

Every loader goes through one preprocessing path (`preprocess`):
  1. pixels scaled to [0, 1] (/255 for images, /16 for digits);
  2. the training images shuffled with a seeded generator, and the last
     `validation_ratio` of them set aside as the validation split;
  3. the per-channel mean of the remaining training split subtracted from every split;
  4. images flattened to rows (channel-major, as torch stores them), and with
     `bias_trick` a column of ones appended.
The result is the dict of the classic assignment code: X_train, y_train, X_val, y_val,
X_test, y_test (the test entries are None without a test set), plus `classes` and
`image_shape`.
"""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np
import torch

from .utils import default_device

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


class DataError(RuntimeError):
    """A dataset cannot be read (missing folder, inconsistent classes, bad files)."""


def preprocess(x_train, y_train, x_test=None, y_test=None, *, scale: float = 255.0,
               validation_ratio: float = 0.2, seed: int = 0, bias_trick: bool = False,
               flatten: bool = True, dtype=torch.float32, device=None, classes=None) -> dict:
    """The shared preprocessing (module docstring).  Images are uint8/float arrays of
    shape (N, C, H, W); labels integer arrays."""
    if not 0.0 <= validation_ratio < 1.0:
        raise ValueError(f"validation_ratio must be in [0, 1), got {validation_ratio}")
    device = torch.device(device) if device is not None else default_device()

    def to_tensor(x):
        return torch.as_tensor(np.asarray(x)).to(dtype) / scale

    x_train, y_train = to_tensor(x_train), torch.as_tensor(np.asarray(y_train), dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x_train), generator=g)
    x_train, y_train = x_train[order], y_train[order]
    n_train = int(round(len(x_train) * (1.0 - validation_ratio)))
    x_val, y_val = x_train[n_train:], y_train[n_train:]
    x_train, y_train = x_train[:n_train], y_train[:n_train]
    splits = {"train": (x_train, y_train), "val": (x_val, y_val)}
    if x_test is not None:
        splits["test"] = (to_tensor(x_test), torch.as_tensor(np.asarray(y_test), dtype=torch.int64))

    image_shape = tuple(x_train.shape[1:])
    mean = x_train.mean(dim=(0,) + tuple(range(2, x_train.dim())), keepdim=True)  # per channel
    out = {"classes": list(classes) if classes is not None else None, "image_shape": image_shape,
           "pixel_mean": mean.flatten()}  # per channel: what `features` adds back
    for name in ("train", "val", "test"):
        if name not in splits:
            out[f"X_{name}"], out[f"y_{name}"] = None, None
            continue
        x, y = splits[name]
        x = x - mean
        if flatten or bias_trick:
            x = x.flatten(1)
        if bias_trick:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=dtype)], dim=1)
        out[f"X_{name}"], out[f"y_{name}"] = x.to(device), y.to(device)
    return out


def train_plus_val(data: dict) -> dict:
    """The data dict for a refit: the validation split appended to the training split
    (X_val and y_val then None; the test split unchanged).  After a search has chosen a
    configuration on the validation split, the model trained on all of it generalizes
    better (scikit-learn's GridSearchCV(refit=True) does the same)."""
    out = dict(data)
    if data.get("X_val") is not None and len(data["X_val"]):
        out["X_train"] = torch.cat([data["X_train"], data["X_val"]])
        out["y_train"] = torch.cat([data["y_train"], data["y_val"]])
        if data.get("X_train_mirrored") is not None:  # feature rows (features.featurize)
            out["X_train_mirrored"] = torch.cat([data["X_train_mirrored"], data["X_val_mirrored"]])
    out["X_val"], out["y_val"] = None, None
    out.pop("X_val_mirrored", None)
    return out


def refit_split(data: dict, train_data: dict, num_iters: int, augment_data=None) -> tuple[dict, int]:
    """(refit data, iterations) for a search's refit: train_plus_val(data) augmented like
    the search's training data `train_data` was, and the iterations that keep the search
    runs' number of epochs (an epoch grows with the training split, so a schedule per
    epoch is unchanged)."""
    refit_data = train_plus_val(data)
    if augment_data is not None:
        refit_data = augment_data(refit_data)
    iters = int(round(num_iters * len(refit_data["y_train"]) / max(len(train_data["y_train"]), 1)))
    return refit_data, iters


def standardize(data: dict, eps: float = 1e-6) -> dict:
    """The data dict with every split's pixel values divided by that pixel's standard
    deviation over the training split (constant pixels by 1); a bias column, if any, is
    left alone.  Call it before `mirror_augment` so the statistics are the original
    images'.

    Pixels differ in spread (the image centre varies more than the border), and the
    hinge's fixed margin makes the SVM sensitive to that: on CIFAR-10 it gains ~0.2
    points of validation accuracy there (README, "CIFAR-10 results")."""
    shape = tuple(data.get("image_shape") or ())
    pixels = int(np.prod(shape)) if shape else None
    X = data["X_train"]
    flat = X.reshape(X.shape[0], -1)
    if pixels is None or flat.shape[1] not in (pixels, pixels + 1):
        raise ValueError(f"standardize: X_train rows hold {flat.shape[1]} values, image_shape {shape}")
    std = flat[:, :pixels].std(dim=0)
    scale = torch.where(std > eps, std, torch.ones_like(std))
    out = dict(data)
    for name in ("X_train", "X_val", "X_test"):
        Xs = data.get(name)
        if Xs is None:
            continue
        rows = Xs.reshape(Xs.shape[0], -1)
        out[name] = torch.cat([rows[:, :pixels] / scale, rows[:, pixels:]], dim=1).reshape(Xs.shape)
    return out


# ---- scikit-learn digits (bundled: the offline default) --------------------------------


def mirror_augment(data: dict) -> dict:
    """The data dict with the mirror image (flipped left to right) of every training
    image appended to the training split (labels repeated); validation and test splits
    are unchanged.  Rows may be flattened, with or without the bias column.

    Mirroring keeps a photo's class (a car facing left is still a car), so for the
    two-layer net on CIFAR-10 it acts as twice the training data: the default search's
    best validation accuracy rises from 55.1% to 56.9% (README, "CIFAR-10 results").

    A dict of image features (features.featurize with mirrored=True) carries the
    features of the mirror images, computed from the pixels: those rows are appended."""
    X = data["X_train"]
    if data.get("X_train_mirrored") is not None:
        out = dict(data)
        out["X_train"] = torch.cat([X, data["X_train_mirrored"]])
        out["y_train"] = torch.cat([data["y_train"], data["y_train"]])
        out.pop("X_train_mirrored")
        out.pop("X_val_mirrored", None)
        return out
    shape = tuple(data.get("image_shape") or ())
    if len(shape) < 2:
        raise ValueError(f"mirror_augment needs images (image_shape (C, H, W) or (H, W)), got {shape}")
    n, pixels = X.shape[0], int(np.prod(shape))
    flat = X.reshape(n, -1)
    if flat.shape[1] not in (pixels, pixels + 1):
        raise ValueError(f"X_train rows hold {flat.shape[1]} values, image_shape {shape} has {pixels}")
    mirrored = torch.flip(flat[:, :pixels].reshape(n, *shape), dims=[-1]).reshape(n, pixels)
    mirrored = torch.cat([mirrored, flat[:, pixels:]], dim=1)  # the bias column, if any
    out = dict(data)
    out["X_train"] = torch.cat([X, mirrored.reshape(X.shape)])
    out["y_train"] = torch.cat([data["y_train"], data["y_train"]])
    return out


def random_crop_flip(image_shape, pad: int = 4, flip: bool = True, generator=None):
    """A minibatch augmenter for nn_train(augment=...): each row, an image of
    `image_shape` (C, H, W) flattened (a bias column after it is kept), is shifted by a
    random offset in [-pad, pad] on both axes (the pixels shifted in are 0, the training
    mean after `preprocess`) and, with `flip`, mirrored left to right with probability
    1/2.  A fresh draw per call: the net sees a new version of an image each time.

    Shifts and mirror images keep a photo's class, so they act as more training data
    for the two-layer net on CIFAR-10 (docs/cifar10.md)."""
    shape = tuple(image_shape)
    if len(shape) != 3:
        raise ValueError(f"random_crop_flip needs image_shape (C, H, W), got {shape}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    channels, height, width = shape
    pixels = channels * height * width

    def augment(X):
        n = X.shape[0]
        if X.shape[1] < pixels:
            raise ValueError(f"rows hold {X.shape[1]} values, image_shape {shape} needs {pixels}")
        images = X[:, :pixels].reshape(n, channels, height, width)
        kw = dict(device=X.device, generator=generator)
        # One gather does both: pixel (r, c) of the output is pixel (r + dy, c' + dx) of the
        # zero-padded image, c' = c or, mirrored, width - 1 - c.
        padded_width = width + 2 * pad
        padded = torch.nn.functional.pad(images, (pad,) * 4) if pad else images
        cols = torch.arange(width, device=X.device).expand(n, width)
        if flip:
            mirror = torch.rand(n, 1, **kw) < 0.5
            cols = torch.where(mirror, width - 1 - cols, cols)
        offset = (torch.randint(0, 2 * pad + 1, (n, 1, 1), **kw) * padded_width
                  + torch.randint(0, 2 * pad + 1, (n, 1, 1), **kw))
        index = (torch.arange(height, device=X.device)[None, :, None] * padded_width
                 + cols[:, None, :] + offset).view(n, 1, height * width)
        out = padded.flatten(2).gather(2, index.expand(n, channels, height * width)).view(n, pixels)
        return out if X.shape[1] == pixels else torch.cat([out, X[:, pixels:]], dim=1)

    return augment


def load_digits(validation_ratio: float = 0.2, test_ratio: float = 0.2, seed: int = 0,
                bias_trick: bool = False, flatten: bool = True, dtype=torch.float32,
                device=None) -> dict:
    """scikit-learn's 1797 8x8 digit images (values 0..16), 10 classes.  A seeded
    `test_ratio` of them is held out as the test split; the rest goes through
    `preprocess` (which then takes the validation split)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = d.images.astype(np.float32)[:, None]  # (N, 1, 8, 8)
    labels = d.target.astype(np.int64)
    g = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(len(images), generator=g).numpy()
    n_test = int(round(len(images) * test_ratio))
    test, train = order[:n_test], order[n_test:]
    return preprocess(images[train], labels[train], images[test] if n_test else None,
                      labels[test] if n_test else None, scale=16.0,
                      validation_ratio=validation_ratio, seed=seed, bias_trick=bias_trick,
                      flatten=flatten, dtype=dtype, device=device,
                      classes=[str(c) for c in range(10)])


# ---- CIFAR-10 --------------------------------------------------------------------------


def _read_cifar_batches(folder, names):
    xs, ys = [], []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64))
        except (OSError, KeyError, ValueError, pickle.UnpicklingError) as e:
            raise DataError(f"cannot read CIFAR-10 batch {path}: {e}") from e
    return np.concatenate(xs), np.concatenate(ys)


def load_cifar10_arrays(root: str):
    """(x_train, y_train, x_test, y_test) as uint8 (N, 3, 32, 32) / int64 arrays, read
    from the official python batches under root/cifar-10-batches-py; when they are not
    there, torchvision.datasets.CIFAR10 downloads them first (needs a network)."""
    folder = os.path.join(root, "cifar-10-batches-py")
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    if not all(os.path.exists(os.path.join(folder, n)) for n in train_names + ["test_batch"]):
        try:
            import torchvision

            torchvision.datasets.CIFAR10(root, train=True, download=True)
        except Exception as e:  # noqa: BLE001  (no network, or no torchvision)
            raise DataError(f"CIFAR-10 is not under {folder} and could not be downloaded: {e}") from e
    x_train, y_train = _read_cifar_batches(folder, train_names)
    x_test, y_test = _read_cifar_batches(folder, ["test_batch"])
    return x_train, y_train, x_test, y_test


def preprocess_cifar10(cuda: bool | None = None, show_examples=False, bias_trick: bool = False,
                       flatten: bool = True, validation_ratio: float = 0.2, dtype=torch.float32,
                       root: str = "./data", seed: int = 0, device=None) -> dict:
    """CIFAR-10 through `preprocess` (the classic assignment's loader).

    cuda: put the tensors on the GPU (default: when one is available); `device` overrides.
    show_examples: True or a PNG path: save a grid of training images (plots.image_grid).
    """
    x_train, y_train, x_test, y_test = load_cifar10_arrays(root)
    if device is None:
        device = "cuda" if (cuda if cuda is not None else torch.cuda.is_available()) else "cpu"
    if show_examples:
        from . import plots

        path = show_examples if isinstance(show_examples, str) else "cifar10_examples.png"
        plots.image_grid(torch.as_tensor(x_train[:80]).float() / 255, y_train[:80], CIFAR10_CLASSES, path)
    return preprocess(x_train, y_train, x_test, y_test, scale=255.0,
                      validation_ratio=validation_ratio, seed=seed, bias_trick=bias_trick,
                      flatten=flatten, dtype=dtype, device=device, classes=CIFAR10_CLASSES)


# ---- image folders (torchvision.datasets.ImageFolder), with a decode cache -------------


def _cache_dir(cache_dir):
    if cache_dir:
        return cache_dir
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "linclass")


def _decode_folder(folder: str, cache_dir: str | None, size: int | None):
    """(images uint8 (N, 3, H, W), labels, class names) of an image folder; the decoded
    arrays are cached (keyed by the folder's path, file names, sizes and times), so a
    second run does not decode every image again."""
    if not os.path.isdir(folder):
        raise DataError(f"image folder not found: {folder}")
    try:
        import torchvision
    except ImportError as e:
        raise DataError("reading an image folder needs torchvision: pip install "
                        f"'linclass[data]' ({e})") from e

    try:
        ds = torchvision.datasets.ImageFolder(folder)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{folder} is not an image folder (one sub-folder per class): {e}") from e
    h = hashlib.sha256(f"{os.path.abspath(folder)}|{size}".encode())
    for path, label in ds.samples:
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, folder)}|{label}|{st.st_size}|{st.st_mtime_ns}".encode())
    cache = os.path.join(_cache_dir(cache_dir), f"imagefolder-{h.hexdigest()[:24]}.npz")
    if os.path.exists(cache):
        with np.load(cache, allow_pickle=False) as z:
            return z["images"], z["labels"], list(z["classes"])
    images, shape = [], None
    for path, _ in ds.samples:
        try:
            img = ds.loader(path)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot decode image {path}: {e}") from e
        if size:
            img = img.resize((size, size))
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise DataError(f"{path} is {arr.shape[1]}x{arr.shape[0]}, the first image was "
                            f"{shape[1]}x{shape[0]}; pass size= to resize them all")
        images.append(arr.transpose(2, 0, 1))
    if not images:
        raise DataError(f"no images in {folder}")
    images = np.stack(images)
    labels = np.asarray([label for _, label in ds.samples], dtype=np.int64)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = cache + f".{os.getpid()}.tmp.npz"
    np.savez(tmp, images=images, labels=labels, classes=np.asarray(ds.classes))
    os.replace(tmp, cache)
    return images, labels, list(ds.classes)


def split_image_folder(src: str, out: str, test_count: int = 10000, seed: int = 0) -> tuple[str, str]:
    """Set `test_count` images of the image folder `src` aside as a test split:
    out/train/<class>/ and out/test/<class>/ get symbolic links to the images (nothing is
    copied).  The split is stratified (each class gives its share, in proportion to its
    size, rounded so the total is exact) and seeded: the same seed gives the same split.
    Returns (train_dir, test_dir); an existing `out` must hold the same split.

    For a dataset that ships without a test split (such as the 50,000 CIFAR-10 training
    images here): search and refit on out/train, and report the figures on out/test,
    which no choice was made on."""
    if not os.path.isdir(src):
        raise DataError(f"image folder not found: {src}")
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir())
    files = {c: sorted(e.name for e in os.scandir(os.path.join(src, c)) if e.is_file()) for c in classes}
    total = sum(len(v) for v in files.values())
    if not classes or total == 0:
        raise DataError(f"{src} is not an image folder (one sub-folder of images per class)")
    if not 0 < test_count < total:
        raise ValueError(f"test_count must be in [1, {total - 1}] for {src} ({total} images), "
                         f"got {test_count}")
    # Largest remainders: each class's exact share, the rounding given to the largest
    # fractions, so the counts add up to test_count.
    shares = {c: test_count * len(files[c]) / total for c in classes}
    counts = {c: int(shares[c]) for c in classes}
    for c in sorted(classes, key=lambda c: shares[c] - counts[c], reverse=True)[:test_count - sum(counts.values())]:
        counts[c] += 1
    g = torch.Generator().manual_seed(seed)
    train_dir, test_dir = os.path.join(out, "train"), os.path.join(out, "test")
    for c in classes:
        order = torch.randperm(len(files[c]), generator=g).tolist()
        chosen = set(order[:counts[c]])
        for split_dir, names in ((test_dir, [n for i, n in enumerate(files[c]) if i in chosen]),
                                 (train_dir, [n for i, n in enumerate(files[c]) if i not in chosen])):
            folder = os.path.join(split_dir, c)
            os.makedirs(folder, exist_ok=True)
            for name in names:
                link, target = os.path.join(folder, name), os.path.abspath(os.path.join(src, c, name))
                if os.path.lexists(link):
                    if os.path.realpath(link) != os.path.realpath(target):
                        raise DataError(f"{link} exists and is not a link to {target}: "
                                        f"{out} holds another split")
                    continue
                os.symlink(target, link)
    for split_dir, want in ((test_dir, test_count), (train_dir, total - test_count)):
        have = sum(len(os.listdir(os.path.join(split_dir, c))) for c in classes)
        if have != want:
            raise DataError(f"{split_dir} holds {have} images, the split has {want}: "
                            f"{out} holds another split (remove it or choose another folder)")
    return train_dir, test_dir


def load_image_folder(train_dir: str, test_dir: str | None = None, validation_ratio: float = 0.2,
                      seed: int = 0, bias_trick: bool = False, flatten: bool = True,
                      dtype=torch.float32, device=None, size: int | None = None,
                      cache_dir: str | None = None) -> dict:
    """Image folders (train_dir/<class>/<image>, and optionally test_dir with the same class
    names) through `preprocess`.  All images must share one size unless `size` resizes
    them to size x size."""
    x_train, y_train, classes = _decode_folder(train_dir, cache_dir, size)
    x_test = y_test = None
    if test_dir is not None:
        x_test, y_test, test_classes = _decode_folder(test_dir, cache_dir, size)
        if test_classes != classes:
            raise DataError(f"class names differ between {train_dir} {classes} and "
                            f"{test_dir} {test_classes}")
        if x_test.shape[1:] != x_train.shape[1:]:
            raise DataError(f"test images are {x_test.shape[2:]} but training images are "
                            f"{x_train.shape[2:]}; pass size= to resize them")
    return preprocess(x_train, y_train, x_test, y_test, scale=255.0,
                      validation_ratio=validation_ratio, seed=seed, bias_trick=bias_trick,
                      flatten=flatten, dtype=dtype, device=device, classes=classes)
