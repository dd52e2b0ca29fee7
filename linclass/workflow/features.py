"""Image features for the linear classifiers: the classic assignment's features exercise
(histograms of oriented gradients and a hue histogram) in torch.

A linear model on raw pixels reaches a ceiling on CIFAR-10 that better optimization does
not lift (trained to convergence, with or without whitening: docs/cifar10.md); on these
features the same models do much better.  `featurize` turns a pixel data dict
(`data.preprocess`) into a feature data dict the classifiers and searches take
unchanged.

Features of an image with pixels in [0, 1] (RGB, any size H x W >= 8 x 8):
  * HOG: gray = 0.299 R + 0.587 G + 0.114 B; gradients by central differences (the
    border pixel repeated); each pixel's gradient magnitude goes to one of 9 bins of
    unsigned orientation (0-180 degrees); the bins are averaged over a 4 x 4 and an
    8 x 8 grid of cells (adaptive pooling, so any image size gives the same count):
    (16 + 64) x 9 = 720 values.  No block normalization (as in the classic exercise).
  * Hue histogram: the fraction of the image's pixels in each of 10 hue bins
    (HSV hue; gray pixels count in bin 0, as the classic color_histogram_hsv does).
Each feature is then standardized with its mean and standard deviation over the
training split, and the bias column appended if the pixel rows had one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

HOG_BINS = 9
HOG_GRIDS = (4, 8)
HUE_BINS = 10
_CHUNK = 1024  # images per pass: the (chunk, 9, H, W) histogram planes stay in cache


def feature_count() -> int:
    """Features per image (the image size does not change it)."""
    return sum(g * g for g in HOG_GRIDS) * HOG_BINS + HUE_BINS


def hog(gray: torch.Tensor) -> torch.Tensor:
    """(N, H, W) gray images -> (N, 720) cell histograms of oriented gradients."""
    n, height, width = gray.shape
    g = F.pad(gray[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    gx = g[:, 1:-1, 2:] - g[:, 1:-1, :-2]
    gy = g[:, 2:, 1:-1] - g[:, :-2, 1:-1]
    magnitude = torch.sqrt(gx * gx + gy * gy)
    angle = torch.atan2(gy, gx).remainder_(math.pi)  # unsigned: [0, pi)
    bins = (angle * (HOG_BINS / math.pi)).long().clamp_(max=HOG_BINS - 1)
    # One scatter into the finest grid's cells (pixel (i, j) is in cell (i * G // H,
    # j * G // W)); a coarser grid G / 2^k sums 2^k x 2^k of them, as its cells nest.
    fine = max(HOG_GRIDS)
    rows = torch.arange(height) * fine // height
    cols = torch.arange(width) * fine // width
    cell = (rows[:, None] * fine + cols[None, :]).flatten()
    sums = torch.zeros(n, fine * fine * HOG_BINS, dtype=gray.dtype)
    sums.scatter_add_(1, cell * HOG_BINS + bins.flatten(1), magnitude.flatten(1))
    counts = torch.bincount(cell, minlength=fine * fine).to(gray.dtype)
    out = []
    for grid in HOG_GRIDS:
        k = fine // grid
        s = sums.view(n, grid, k, grid, k, HOG_BINS).sum(dim=(2, 4))
        c = counts.view(grid, k, grid, k).sum(dim=(1, 3))
        out.append((s / c[None, :, :, None]).flatten(1))  # mean magnitude per pixel of the cell
    return torch.cat(out, dim=1)


def hue_histogram(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 1] -> (N, 10) fractions of pixels per hue bin."""
    r, g, b = rgb.unbind(1)
    high, _ = rgb.max(dim=1)
    low, _ = rgb.min(dim=1)
    spread = high - low
    safe = torch.where(spread > 0, spread, torch.ones_like(spread))
    hue = torch.where(high == r, ((g - b) / safe).remainder(6.0),
                      torch.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = torch.where(spread > 0, hue / 6.0, torch.zeros_like(hue))  # in [0, 1)
    idx = (hue * HUE_BINS).long().clamp_(0, HUE_BINS - 1).flatten(1)
    counts = torch.zeros(rgb.shape[0], HUE_BINS, dtype=rgb.dtype)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=rgb.dtype))
    return counts / idx.shape[1]


def image_features(images: torch.Tensor, offset: torch.Tensor | None = None,
                   mirror: bool = False) -> torch.Tensor:
    """(N, 3, H, W) float images with pixels in [0, 1] (after adding `offset`, a per-channel
    (3,) tensor, if given; mirrored left to right with `mirror`) -> (N, 730) raw features.
    Works through the images a block at a time, so no full-size copy is made."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"image_features needs RGB images (N, 3, H, W), got shape {tuple(images.shape)}")
    if min(images.shape[2:]) < max(HOG_GRIDS):
        raise ValueError(f"image_features needs images of at least {max(HOG_GRIDS)} x {max(HOG_GRIDS)} "
                         f"pixels, got {tuple(images.shape[2:])}")
    if max(HOG_GRIDS) % min(HOG_GRIDS):
        raise AssertionError("the HOG grids must nest")
    out = torch.empty(images.shape[0], feature_count(), dtype=images.dtype)
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype)
    for i in range(0, images.shape[0], _CHUNK):
        chunk = images[i:i + _CHUNK].cpu()
        if offset is not None:
            chunk = chunk + offset.to(chunk).reshape(1, 3, 1, 1)
        if mirror:
            chunk = chunk.flip(-1)
        gray = torch.einsum("nchw,c->nhw", chunk, weights)
        out[i:i + _CHUNK] = torch.cat([hog(gray), hue_histogram(chunk)], dim=1)
    return out


def featurize(data: dict, mirrored: bool = False) -> dict:
    """A pixel data dict (`data.preprocess` of RGB images, rows flattened, with or without
    the bias column) -> the same dict with every split's rows replaced by standardized
    image features (+ the bias column).  `image_shape` becomes None (rows are no longer
    images) and `features` names the transform.  With `mirrored`, the features of every
    split's mirror images are kept too (`X_train_mirrored`, `X_val_mirrored`), which
    `data.mirror_augment` appends: a feature row cannot be mirrored after the fact."""
    shape = tuple(data.get("image_shape") or ())
    mean = data.get("pixel_mean")
    if len(shape) != 3 or shape[0] != 3 or mean is None:
        raise ValueError("featurize needs a data dict of RGB images from data.preprocess "
                         f"(image_shape (3, H, W) and pixel_mean), got image_shape {shape or None}")
    pixels = math.prod(shape)
    X = data["X_train"]
    if X.dim() != 2 or X.shape[1] not in (pixels, pixels + 1):
        raise ValueError(f"featurize: X_train rows hold {tuple(X.shape[1:])} values, "
                         f"image_shape {shape} has {pixels}")
    bias = X.shape[1] == pixels + 1

    def raw(Xs, mirror):
        return image_features(Xs[:, :pixels].reshape(-1, *shape), offset=mean, mirror=mirror)

    out = dict(data)
    train = raw(X, False)
    centre = train.mean(dim=0)
    spread = train.std(dim=0)
    spread = torch.where(spread > 1e-6, spread, torch.ones_like(spread))

    def rows(features, like):
        z = (features - centre) / spread
        if bias:
            z = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
        return z.to(dtype=like.dtype, device=like.device)

    out["X_train"] = rows(train, X)
    for name in ("X_val", "X_test"):
        if data.get(name) is not None:
            out[name] = rows(raw(data[name], False), X)
    if mirrored:
        for name in ("X_train", "X_val"):
            if data.get(name) is not None:
                out[f"{name}_mirrored"] = rows(raw(data[name], True), X)
    out["image_shape"] = None
    out["features"] = "hog+hue"
    return out
