"""Linear classifiers (multiclass SVM, softmax) trained with minibatch SGD.

The API is the classic assignment's linear_classifier.py (CS231n / EECS 498-007), so its
notebooks run with only the import changed; the losses live in workflow/losses.py and
are importable from here under their classic names.  LinearSVM and Softmax train on
linclass's fused losses; on CPU float32 data their `train` runs one fused C++ step per
iteration (linclass.sgd.linear_sgd_step: gather, scores, loss, dW and the update) and
draws the same minibatches as the plain loop.
"""

from __future__ import annotations

import torch

from linclass import sgd

from .losses import (  # noqa: F401  (the classic module's names)
    softmax_loss_fused,
    softmax_loss_naive,
    softmax_loss_vectorized,
    svm_loss_fused,
    svm_loss_naive,
    svm_loss_vectorized,
)
from .utils import load_checkpoint, reset_seed

# ---- training -------------------------------------------------------------------------


def sample_batch(X, y, num_train, batch_size):
    """batch_size random examples, drawn with replacement (torch.randint)."""
    indices = torch.randint(num_train, (batch_size,))
    # index_select: the same rows as X[indices], gathered ~2x faster on the CPU.
    return X.index_select(0, indices.to(X.device)), y.index_select(0, indices.to(y.device))


def _init_weight(W, X, y):
    if W is None:
        num_classes = int(torch.max(y)) + 1
        W = 0.000001 * torch.randn(X.shape[1], num_classes, device=X.device, dtype=X.dtype)
    return W


def train_linear_classifier(loss_func, W, X, y, learning_rate=1e-3, reg=1e-5, num_iters=100,
                            batch_size=200, verbose=False, progress=None):
    """Plain minibatch SGD; W None starts from 1e-6 * randn(D, max(y) + 1).
    Returns (W, loss_history).  `progress(it)` is called after each iteration when given."""
    num_train = X.shape[0]
    W = _init_weight(W, X, y)
    loss_history = []
    for it in range(num_iters):
        X_batch, y_batch = sample_batch(X, y, num_train, batch_size)
        loss, grad = loss_func(W, X_batch, y_batch, reg)
        loss_history.append(float(loss))
        W -= learning_rate * grad
        if verbose and it % 100 == 0:
            print(f"iteration {it} / {num_iters}: loss {float(loss):f}")
        if progress is not None:
            progress(it)
    return W, loss_history


def _fast_path_ok(X, W, y) -> bool:
    return sgd.available(X) and X.dim() == 2 and X.is_contiguous() and W.dtype == torch.float32


def _train_fast(kind, W, X, y, learning_rate, reg, num_iters, batch_size, verbose, progress):
    """train_linear_classifier for the fused losses on CPU float32: the same minibatches
    (torch.randint per iteration), one C++ call per step."""
    num_train = X.shape[0]
    W = _init_weight(W, X, y)
    Wt = W.t().contiguous()  # (C, D): the layout the kernels stream
    y = y.to(torch.int64).contiguous()
    loss_history = []
    for it in range(num_iters):
        loss = sgd.linear_sgd_step(X, Wt, y, torch.randint(num_train, (batch_size,)), kind,
                                   learning_rate, reg)
        loss_history.append(loss)
        if verbose and it % 100 == 0:
            print(f"iteration {it} / {num_iters}: loss {loss:f}")
        if progress is not None:
            progress(it)
    W.copy_(Wt.t())
    return W, loss_history


def predict_linear_classifier(W, X):
    """Class predictions argmax_c (X W)_c, as int64."""
    return torch.argmax(X.mm(W), dim=1)


# ---- the classes ------------------------------------------------------------------------


class LinearClassifier:
    """A linear classifier trained with SGD; subclasses define `loss`."""

    fused_kind: str | None = None  # "svm" / "softmax" for the fused fast path

    def __init__(self):
        reset_seed(0)
        self.W = None

    def train(self, X_train, y_train, learning_rate=1e-3, reg=1e-5, num_iters=100,
              batch_size=200, verbose=False, progress=None):
        """SGD on (X_train, y_train); returns the loss history."""
        W = _init_weight(self.W, X_train, y_train)
        if self.fused_kind and _fast_path_ok(X_train, W, y_train):
            self.W, history = _train_fast(self.fused_kind, W, X_train, y_train, learning_rate,
                                          reg, num_iters, batch_size, verbose, progress)
        else:
            self.W, history = train_linear_classifier(self.loss, W, X_train, y_train,
                                                      learning_rate, reg, num_iters, batch_size,
                                                      verbose, progress)
        return history

    def predict(self, X):
        return predict_linear_classifier(self.W, X)

    def loss(self, W, X_batch, y_batch, reg):
        raise NotImplementedError

    def _loss(self, X_batch, y_batch, reg):
        return self.loss(self.W, X_batch, y_batch, reg)

    def save(self, path):
        torch.save({"W": self.W}, path)
        print(f"Saved in {path}")

    def load(self, path):
        state = load_checkpoint(path, "a linear classifier checkpoint")
        if not isinstance(state, dict) or not isinstance(state.get("W"), torch.Tensor) or state["W"].dim() != 2:
            raise ValueError(f"{path} is not a linear classifier checkpoint ({{'W': (D, C) tensor}})")
        self.W = state["W"]
        print(f"load checkpoint file: {path}")


class LinearSVM(LinearClassifier):
    """Multiclass SVM, on linclass's fused kernels."""

    fused_kind = "svm"

    def loss(self, W, X_batch, y_batch, reg):
        return svm_loss_fused(W, X_batch, y_batch, reg)


class Softmax(LinearClassifier):
    """Softmax classifier, on linclass's fused kernels."""

    fused_kind = "softmax"

    def loss(self, W, X_batch, y_batch, reg):
        return softmax_loss_fused(W, X_batch, y_batch, reg)


# ---- hyperparameters ------------------------------------------------------------------


def svm_get_search_params(standardized: bool = False, features: bool = False):
    """(learning_rates, regularization_strengths) searched for the SVM: 3 x 3 pairs
    around the best of a 5 x 5 grid (lr 3e-3..5e-2, reg 1e-4..5e-2) on the CIFAR-10
    validation split (bias trick), refined for 4000 iterations of batch 1000.

    standardized: the grid for pixels divided by their standard deviation
    (`linclass.workflow.data.standardize`, the CLI's default for the SVM on photos), whose
    features are ~4x larger: learning rates ~16x smaller, and a region re-searched on a
    CIFAR-10 validation split with mirror images for 8000 iterations of batch 1000 (the
    CLI's setting for photos; the best moved to smaller rates and more regularization
    as the runs grew longer: docs/cifar10.md).

    features: the grid for image features (`linclass.workflow.features`, standardized),
    chosen on the same CIFAR-10 validation split with their mirror images, 8000
    iterations of batch 1000; accuracy there is flat within 0.5 points over it."""
    if features:
        return [3e-4, 1e-3, 3e-3], [1e-2, 3e-2, 1e-1]
    if standardized:
        return [1.5e-4, 3e-4, 6e-4], [2e-2, 8e-2, 3.2e-1]
    learning_rates = [5e-3, 1e-2, 2e-2]
    regularization_strengths = [1e-3, 5e-3, 1e-2]
    return learning_rates, regularization_strengths


def softmax_get_search_params(features: bool = False):
    """(learning_rates, regularization_strengths) searched for the softmax classifier:
    3 x 3 pairs on the CIFAR-10 validation split (bias trick, mirror images), for 8000
    iterations of batch 1000 (the CLI's setting for photos), where learning rates of
    0.025-0.1 and reg 1e-3 did best (docs/cifar10.md).  features: the grid for image
    features (`linclass.workflow.features`), chosen the same way."""
    if features:
        return [2.5e-3, 5e-3, 1e-2], [3e-3, 1e-2, 3e-2]
    learning_rates = [2.5e-2, 5e-2, 1e-1]
    regularization_strengths = [1e-4, 1e-3, 1e-2]
    return learning_rates, regularization_strengths


def _accuracy(y_pred, y) -> float:
    return 100.0 * (y == y_pred).double().mean().item()


def test_one_param_set(cls, data_dict, lr, reg, num_iters=2000):
    """Train `cls` with (lr, reg); returns (cls, train_acc, val_acc), accuracies in %."""
    cls.train(data_dict["X_train"], data_dict["y_train"], lr, reg, num_iters)
    train_acc = _accuracy(cls.predict(data_dict["X_train"]), data_dict["y_train"])
    val_acc = _accuracy(cls.predict(data_dict["X_val"]), data_dict["y_val"])
    return cls, train_acc, val_acc


test_one_param_set.__test__ = False  # not a pytest test, despite the name
