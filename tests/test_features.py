"""Image features (linclass/workflow/features.py) against a per-pixel loop in float64."""

import colorsys
import math

import numpy as np
import pytest
import torch

from linclass.workflow import data, features


def _loop_features(image):
    """One (3, H, W) float64 image -> the 730 features, pixel by pixel."""
    _, H, W = image.shape
    r, g, b = (image[c].tolist() for c in range(3))
    gray = [[0.299 * r[i][j] + 0.587 * g[i][j] + 0.114 * b[i][j] for j in range(W)] for i in range(H)]
    out = []
    for grid in features.HOG_GRIDS:
        sums = np.zeros((grid, grid, features.HOG_BINS))
        counts = np.zeros((grid, grid))
        for i in range(H):
            for j in range(W):
                gx = gray[i][min(j + 1, W - 1)] - gray[i][max(j - 1, 0)]
                gy = gray[min(i + 1, H - 1)][j] - gray[max(i - 1, 0)][j]
                angle = math.atan2(gy, gx) % math.pi
                k = min(int(angle * features.HOG_BINS / math.pi), features.HOG_BINS - 1)
                cell = (i * grid // H, j * grid // W)
                sums[cell][k] += math.hypot(gx, gy)
                counts[cell] += 1
        out.extend((sums / counts[..., None]).reshape(-1))
    hist = np.zeros(features.HUE_BINS)
    for i in range(H):
        for j in range(W):
            hue = colorsys.rgb_to_hsv(r[i][j], g[i][j], b[i][j])[0]
            hist[min(int(hue * features.HUE_BINS), features.HUE_BINS - 1)] += 1
    out.extend(hist / (H * W))
    return np.array(out)


def _images(n, h, w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=gen, dtype=torch.float64)
    x[0, :, :3, :] = x[0, :1, :3, :]  # gray pixels (hue 0 by convention)
    x[1, 1, 2:5, :] = x[1, 0, 2:5, :]  # red == green == max: the red branch of the hue
    x[2, :, :, :4] = 0.5  # a flat patch: zero gradients
    return x


@pytest.mark.parametrize("shape", [(8, 8), (12, 16), (32, 32), (19, 9)])
def test_features_match_a_pixel_loop(shape):
    x = _images(4, *shape)
    got = features.image_features(x)
    assert got.shape == (4, features.feature_count()) and got.dtype == torch.float64
    for n in range(len(x)):
        np.testing.assert_allclose(got[n].numpy(), _loop_features(x[n]), rtol=1e-12, atol=1e-12)


def test_offset_and_mirror_are_the_images_shifted_and_flipped():
    x = (_images(3, 16, 16, seed=1) * 256).floor() / 256  # 8-bit pixels: x - offset + offset == x
    offset = torch.tensor([0.25, -0.5, 3 / 256], dtype=torch.float64)
    got = features.image_features(x - offset.view(1, 3, 1, 1), offset=offset, mirror=True)
    torch.testing.assert_close(got, features.image_features(x.flip(-1)), rtol=1e-12, atol=1e-12)
    # block boundaries (1024 images per pass) change nothing
    many = torch.rand(1030, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(features.image_features(many)[1020:], features.image_features(many[1020:]))


@pytest.mark.parametrize("bias_trick", [True, False])
def test_featurize_standardizes_with_training_statistics_and_keeps_mirror_rows(bias_trick):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (30, 3, 10, 12), dtype=np.uint8)
    test = rng.integers(0, 256, (5, 3, 10, 12), dtype=np.uint8)
    d = data.preprocess(imgs, rng.integers(0, 3, 30), test, rng.integers(0, 3, 5),
                        validation_ratio=0.2, seed=0, bias_trick=bias_trick, dtype=torch.float64)
    f = features.featurize(d, mirrored=True)
    assert f["image_shape"] is None and f["features"] == "hog+hue"
    D = features.feature_count()
    assert f["X_train"].shape == (24, D + bias_trick) and f["X_test"].shape == (5, D + bias_trick)

    def raw(X, mirror=False):  # the pixels in [0, 1] back from the centred rows
        images = X[:, :360].reshape(-1, 3, 10, 12) + d["pixel_mean"].view(1, 3, 1, 1)
        return features.image_features(images.flip(-1) if mirror else images)

    train = raw(d["X_train"])
    centre, spread = train.mean(0), train.std(0)
    spread = torch.where(spread > 1e-6, spread, torch.ones_like(spread))
    for name, mirror in [("X_train", False), ("X_val", False), ("X_test", False),
                         ("X_train_mirrored", True), ("X_val_mirrored", True)]:
        source = d[name.replace("_mirrored", "")]
        want = (raw(source, mirror) - centre) / spread
        torch.testing.assert_close(f[name][:, :D], want)
        if bias_trick:
            assert (f[name][:, D] == 1).all()
    # mirror_augment appends the mirror rows; a refit's train + val keeps them in step
    m = data.mirror_augment(f)
    torch.testing.assert_close(m["X_train"], torch.cat([f["X_train"], f["X_train_mirrored"]]))
    assert torch.equal(m["y_train"], torch.cat([f["y_train"], f["y_train"]]))
    assert "X_train_mirrored" not in m
    r = data.mirror_augment(data.train_plus_val(f))
    torch.testing.assert_close(r["X_train"], torch.cat([f["X_train"], f["X_val"],
                                                        f["X_train_mirrored"], f["X_val_mirrored"]]))
    assert r["X_val"] is None and "X_val_mirrored" not in r
    # without mirrored: no mirror rows, and mirror_augment refuses (a feature row is no image)
    plain = features.featurize(d)
    assert "X_train_mirrored" not in plain
    with pytest.raises(ValueError, match="images"):
        data.mirror_augment(plain)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="RGB"):
        features.image_features(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="at least"):
        features.image_features(torch.rand(2, 3, 4, 16))
    digits = data.load_digits()
    with pytest.raises(ValueError, match="RGB images"):
        features.featurize(digits)
