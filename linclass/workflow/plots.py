"""PNG plots of the classifier workflow (matplotlib, Agg backend: no display needed).

Every function writes one PNG to `path` and returns the path.
"""

from __future__ import annotations

import math

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def _to_images(flat: torch.Tensor, image_shape):
    """(K, prod(image_shape)[+1]) rows -> (K, H, W, channels) arrays scaled to [0, 1]."""
    c, h, w = image_shape
    x = flat[:, : c * h * w].detach().float().cpu().reshape(-1, c, h, w)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-12)
    return x.permute(0, 2, 3, 1).numpy()


def _show(ax, img):
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray")
    else:
        ax.imshow(img)
    ax.axis("off")


def loss_history(losses, path, title="Training loss"):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(losses, lw=0.8)
    ax.set(xlabel="iteration", ylabel="loss", title=title)
    return _save(fig, path)


def accuracy_curves(stat: dict, path, title="Classification accuracy"):
    """Train (minibatch) and validation accuracy per epoch, from nn_train's stats."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(stat["train_acc_history"], "o-", label="train")
    ax.plot(stat["val_acc_history"], "o-", label="val")
    ax.set(xlabel="epoch", ylabel="accuracy", title=title)
    ax.legend()
    return _save(fig, path)


def accuracy_curves_of_runs(stats: dict, path, title="Validation accuracy"):
    """Validation (solid) and train (dashed) accuracy of several runs: {label: stat}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, stat in stats.items():
        line, = ax.plot(stat["val_acc_history"], "o-", label=str(label))
        ax.plot(stat["train_acc_history"], "--", color=line.get_color(), alpha=0.5)
    ax.set(xlabel="epoch", ylabel="accuracy", title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def linear_weights(W: torch.Tensor, classes, image_shape, path, title="Weights per class"):
    """One image per class of a linear model's W (D, C) (a bias row is dropped)."""
    plt = _pyplot()
    imgs = _to_images(W.t(), image_shape)
    n = len(imgs)
    cols = min(n, 10)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            _show(ax, imgs[i])
            ax.set_title(str(classes[i]) if classes else str(i), fontsize=8)
        else:
            ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def net_weights(W1: torch.Tensor, image_shape, path, max_units=100, title="First-layer weights"):
    """A grid of the first layer's weights (D, H), one image per hidden unit."""
    return image_grid(W1.t()[:max_units], None, None, path, image_shape=image_shape, title=title)


def image_grid(images: torch.Tensor, labels, classes, path, image_shape=None, title=None):
    """A grid of images: (K, C, H, W) tensors, or (K, D) rows with image_shape."""
    plt = _pyplot()
    if image_shape is None:
        image_shape = tuple(images.shape[1:])
    imgs = _to_images(images.reshape(len(images), -1), image_shape)
    n = len(imgs)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols, rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            _show(ax, imgs[i])
            if labels is not None and classes is not None:
                ax.set_title(str(classes[int(labels[i])]), fontsize=6)
        else:
            ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def sweep_scatter(results: dict, path, title="Hyperparameter search (validation accuracy)"):
    """{(lr, reg): (train_acc, val_acc)} as log lr vs log reg, coloured by val accuracy."""
    plt = _pyplot()
    keys = list(results)
    lrs = [math.log10(k[0]) for k in keys]
    regs = [math.log10(k[1]) if k[1] > 0 else -12 for k in keys]
    val = [results[k][1] for k in keys]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sc = ax.scatter(lrs, regs, c=val, s=200, cmap="viridis")
    fig.colorbar(sc, ax=ax, label="validation accuracy (%)")
    ax.set(xlabel="log10 learning rate", ylabel="log10 regularization", title=title)
    return _save(fig, path)
