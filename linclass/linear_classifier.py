"""Linear classifiers (multiclass SVM, softmax) trained with minibatch SGD.

The API is the classic assignment's linear_classifier.py (CS231n / EECS 498-007), so its
notebooks run with only the import changed.  Conventions:
  W is (D, C), X (N, D), y (N,) int64; every loss function returns (loss, dW) with
  loss = mean data loss over N + reg * sum(W * W), so dW includes 2 * reg * W.
  The SVM loss uses margin 1 and sums over the wrong classes.

Besides the naive (loops) and vectorized (torch) versions, svm_loss_fused and
softmax_loss_fused run linclass's fused linear + loss kernels (scores, loss and dW from
one read of X, never an N x C matrix); LinearSVM and Softmax use them, and their
`train` takes a faster path on CPU float32 data (linclass::linear_sgd_step: the
minibatch gather, scores, loss, dW and the update in one C++ call) that draws the same
minibatches.  `sweep` trains many (learning rate, reg) pairs at once.
"""

from __future__ import annotations

import random

import torch

from . import _ops, backends
from .utils import load_checkpoint, reset_seed

# ---- losses --------------------------------------------------------------------------


def svm_loss_naive(W, X, y, reg):
    """Multiclass SVM loss with explicit loops over examples and classes."""
    dW = torch.zeros_like(W)
    num_classes = W.shape[1]
    num_train = X.shape[0]
    loss = 0.0
    for i in range(num_train):
        scores = W.t().mv(X[i])
        correct_class_score = scores[y[i]]
        for j in range(num_classes):
            if j == y[i]:
                continue
            margin = scores[j] - correct_class_score + 1  # note delta = 1
            if margin > 0:
                loss += margin
                dW[:, j] += X[i]
                dW[:, y[i]] -= X[i]
    loss = loss / num_train + reg * torch.sum(W * W)
    dW = dW / num_train + 2 * reg * W
    return loss, dW


def svm_loss_vectorized(W, X, y, reg):
    """Multiclass SVM loss, vectorized with torch ops (the classic reference)."""
    num_train = X.shape[0]
    scores = X.mm(W)
    correct = scores[torch.arange(num_train), y].unsqueeze(1)
    margins = (scores - correct + 1).clamp(min=0)
    margins[torch.arange(num_train), y] = 0
    loss = margins.sum() / num_train + reg * torch.sum(W * W)
    mask = (margins > 0).to(X.dtype)
    mask[torch.arange(num_train), y] = -mask.sum(dim=1)
    dW = X.t().mm(mask) / num_train + 2 * reg * W
    return loss, dW


def softmax_loss_naive(W, X, y, reg):
    """Softmax (cross-entropy) loss with explicit loops over examples and classes."""
    loss = 0.0
    dW = torch.zeros_like(W)
    num_classes = W.shape[1]
    num_train = X.shape[0]
    for i in range(num_train):
        scores = W.t().mv(X[i])
        scores = scores - scores.max()  # numeric stability
        exp_scores = [torch.exp(scores[j]) for j in range(num_classes)]
        total = sum(exp_scores)
        loss += -scores[y[i]] + torch.log(total)
        for j in range(num_classes):
            p = exp_scores[j] / total
            dW[:, j] += (p - (1.0 if j == y[i] else 0.0)) * X[i]
    loss = loss / num_train + reg * torch.sum(W * W)
    dW = dW / num_train + 2 * reg * W
    return loss, dW


def softmax_loss_vectorized(W, X, y, reg):
    """Softmax loss, vectorized with torch ops (the classic reference)."""
    num_train = X.shape[0]
    scores = X.mm(W)
    scores = scores - scores.max(dim=1, keepdim=True).values
    probs = scores.exp()
    probs /= probs.sum(dim=1, keepdim=True)
    loss = -probs[torch.arange(num_train), y].log().sum() / num_train + reg * torch.sum(W * W)
    dscores = probs
    dscores[torch.arange(num_train), y] -= 1
    dW = X.t().mm(dscores) / num_train + 2 * reg * W
    return loss, dW


def _fused(kind: str, W, X, y, reg):
    """loss and dW from linclass's fused linear + loss op (no autograd involved)."""
    backend = backends.resolve(X.device)
    C = W.shape[1]
    y = y.to(torch.int64)
    mask = [False, True, False]  # the classic classifier's X is data: only dW
    if backend == "torch":
        return (svm_loss_vectorized if kind == "svm" else softmax_loss_vectorized)(W, X, y, reg)
    if kind == "svm":
        op = _ops.LINEAR_MULTI_MARGIN_LOSS[backend]
        loss, _, dWt, _ = op(X, W.t(), None, y, 1, 1.0, 1, mask)
        loss, dWt = loss * C, dWt * C  # torch's hinge divides by C; the classic sums
    else:
        op = _ops.LINEAR_CROSS_ENTROPY[backend]
        loss, _, dWt, _ = op(X, W.t(), None, y, -100, 0.0, 1, mask)
    return loss + reg * torch.sum(W * W), dWt.t() + 2 * reg * W


def svm_loss_fused(W, X, y, reg):
    """Multiclass SVM loss from linclass's fused kernels: linear_multi_margin_loss * C."""
    return _fused("svm", W, X, y, reg)


def softmax_loss_fused(W, X, y, reg):
    """Softmax loss from linclass's fused kernels: linear_cross_entropy."""
    return _fused("softmax", W, X, y, reg)


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
    return (X.device.type == "cpu" and X.dtype == torch.float32 and X.dim() == 2
            and X.is_contiguous() and W.dtype == torch.float32 and "cpp" in backends.available()
            and backends.resolve(X.device) == "cpp")


def _train_fast(kind, W, X, y, learning_rate, reg, num_iters, batch_size, verbose, progress):
    """train_linear_classifier for the fused losses on CPU float32: the same minibatches
    (torch.randint per iteration), one C++ call per step."""
    num_train = X.shape[0]
    W = _init_weight(W, X, y)
    Wt = W.t().contiguous()  # (C, D): the layout the kernels stream
    y = y.to(torch.int64).contiguous()
    step = torch.ops.linclass.linear_sgd_step
    code = 1 if kind == "svm" else 0
    loss_history = []
    for it in range(num_iters):
        loss = step(X, Wt, y, torch.randint(num_train, (batch_size,)), code, learning_rate, reg)
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


def svm_get_search_params(standardized: bool = False):
    """(learning_rates, regularization_strengths) searched for the SVM: 3 x 3 pairs
    around the best of a 5 x 5 grid (lr 3e-3..5e-2, reg 1e-4..5e-2) on the CIFAR-10
    validation split (bias trick), refined for 4000 iterations of batch 1000 (the CLI's
    setting for photos; the classic 2000 x 200 peaks in the same region).

    standardized: the grid for pixels divided by their standard deviation
    (`linclass.data.standardize`, the CLI's default for the SVM on photos), whose
    features are ~4x larger: learning rates ~16x smaller, and a region re-searched on
    the same split (with mirror images)."""
    if standardized:
        return [6e-4, 1.2e-3, 2.4e-3], [5e-3, 2e-2, 8e-2]
    learning_rates = [5e-3, 1e-2, 2e-2]
    regularization_strengths = [1e-3, 5e-3, 1e-2]
    return learning_rates, regularization_strengths


def softmax_get_search_params():
    """(learning_rates, regularization_strengths) searched for the softmax classifier:
    3 x 3 pairs around the best of a 5 x 5 grid (lr 1e-2..2e-1, reg 1e-5..5e-3) on the
    CIFAR-10 validation split (bias trick), refined for 4000 iterations of batch 1000
    (the CLI's setting for photos)."""
    learning_rates = [5e-2, 1e-1, 2e-1]
    regularization_strengths = [1e-5, 1e-4, 1e-3]
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


# ---- the batched sweep ------------------------------------------------------------------

_LOSS_KINDS = {svm_loss_naive: "svm", svm_loss_vectorized: "svm", svm_loss_fused: "svm",
               softmax_loss_naive: "softmax", softmax_loss_vectorized: "softmax",
               softmax_loss_fused: "softmax"}


def _kind_of(model_cls_or_loss):
    if isinstance(model_cls_or_loss, type) and issubclass(model_cls_or_loss, LinearClassifier):
        return model_cls_or_loss.fused_kind, model_cls_or_loss
    return _LOSS_KINDS.get(model_cls_or_loss), None


def sweep(model_cls_or_loss, data_dict, learning_rates, regs, num_iters=2000, batch_size=200,
          seed=0, progress=None):
    """Train every (learning rate, reg) pair at once.

    As in the classic search loop (a fresh LinearSVM()/Softmax() per pair reseeds, so every
    pair starts from the same W and draws the same minibatches), all pairs share W0 and
    the minibatch sequence; their weights sit side by side in one (D, K * C) matrix, so
    one wide product per step serves them all, and each pair's accuracy equals what
    test_one_param_set gives with the same seed (up to float rounding).

    model_cls_or_loss: LinearSVM, Softmax (or another LinearClassifier subclass), or a
    loss function (W, X, y, reg) -> (loss, dW); the SVM and softmax losses are batched,
    any other function is called once per pair and step on the shared minibatch.

    Returns {"results": {(lr, reg): (train_acc, val_acc)}, "best": (lr, reg),
             "best_val": val_acc, "best_model": a trained classifier (or W)}.
    """
    kind, model_cls = _kind_of(model_cls_or_loss)
    X, y = data_dict["X_train"], data_dict["y_train"]
    configs = [(lr, reg) for lr in learning_rates for reg in regs]  # the notebook's order
    reset_seed(seed)
    W0 = _init_weight(None, X, y)
    num_train, K, C = X.shape[0], len(configs), W0.shape[1]
    W = W0.repeat(1, K)  # pair k owns columns [k * C, (k + 1) * C)
    lr = torch.tensor([c[0] for c in configs], dtype=X.dtype, device=X.device).repeat_interleave(C)
    reg = torch.tensor([c[1] for c in configs], dtype=X.dtype, device=X.device).repeat_interleave(C)
    # W -= lr * (X_b^T dS + 2 reg W) as W = (1 - 2 lr reg) W + X_b^T (-lr dS): one scaling
    # pass and one GEMM that accumulates into W (no temporaries of W's size).
    decay = 1 - 2 * lr * reg
    # d(mean data loss)/d scores = (d summed loss / d scores) / B, times C for the SVM
    # (the classic hinge sum is multi_margin_loss times C): one column scale for all steps.
    step_scale = -lr * ((C if kind == "svm" else 1) / batch_size)
    # CPU float32: the whole step in one C++ call (linclass::linear_sgd_sweep_step, the
    # same math as the loop below and the same minibatches: one torch.randint per step).
    fast = kind is not None and _fast_path_ok(X, W, y)
    if fast:
        y_long = y.to(torch.int64).contiguous()
        sweep_step = torch.ops.linclass.linear_sgd_sweep_step
    for it in range(num_iters):
        if fast:
            sweep_step(X, W, y_long, torch.randint(num_train, (batch_size,)),
                       1 if kind == "svm" else 0, K, decay, step_scale)
        else:
            X_batch, y_batch = sample_batch(X, y, num_train, batch_size)
            if kind is None:
                grads = [model_cls_or_loss(W[:, k * C:(k + 1) * C], X_batch, y_batch,
                                           configs[k][1])[1] for k in range(K)]
                W -= lr * torch.cat(grads, dim=1)
            else:
                dscores = _batched_dscores(kind, X_batch.mm(W), y_batch, K, C, step_scale)
                W.mul_(decay).addmm_(X_batch.t(), dscores)
        if progress is not None:
            progress(it)

    def accuracy(Xs, ys):
        # Blocks of 1024 rows: the BLAS runs (1024 x D) @ (D x K*C) products ~30% faster
        # here than one (N x D) @ (D x K*C) product (40000 x 3073 x 250: 0.52 against
        # 0.76 s), and no N x K*C score matrix is kept.
        correct = torch.zeros(K, dtype=torch.int64, device=Xs.device)
        for r0 in range(0, len(Xs), 1024):
            pred = Xs[r0:r0 + 1024].mm(W).view(-1, K, C).argmax(dim=2)
            correct += (pred == ys[r0:r0 + 1024, None]).sum(dim=0)
        return 100.0 * correct.double() / len(Xs)  # no rows: NaN, like a mean of none

    train_acc, val_acc = accuracy(X, y), accuracy(data_dict["X_val"], data_dict["y_val"])
    results = {configs[k]: (train_acc[k].item(), val_acc[k].item()) for k in range(K)}
    best = max(range(K), key=lambda k: val_acc[k].item())
    best_W = W[:, best * C:(best + 1) * C].clone()
    if model_cls is not None:
        best_model = model_cls()
        best_model.W = best_W
    else:
        best_model = best_W
    return {"results": results, "best": configs[best], "best_val": val_acc[best].item(),
            "best_model": best_model}


def _batched_dscores(kind, scores, y_batch, K, C, col_scale):
    """d(summed data loss)/d scores for K pairs side by side, scores (B, K * C), times
    `col_scale` (K * C,) in place of the gradient buffer."""
    B = scores.shape[0]
    rows = scores.view(B * K, C)  # row (b, k): pair k's scores of example b
    targets = y_batch.to(torch.int64).repeat_interleave(K)
    backend = backends.resolve(scores.device)
    if backend == "torch":
        leaf = rows.detach().requires_grad_()
        with torch.enable_grad():
            loss = (torch.nn.functional.multi_margin_loss(leaf, targets, reduction="sum")
                    if kind == "svm" else
                    torch.nn.functional.cross_entropy(leaf, targets, reduction="sum"))
            (grad,) = torch.autograd.grad(loss, leaf)
    elif kind == "svm":
        _, grad = _ops.MULTI_MARGIN_LOSS[backend](rows, targets, 1, 1.0, None, 2, True)
    else:
        _, grad = _ops.CROSS_ENTROPY[backend](rows, targets, None, -100, 0.0, 2, True)
    return grad.view(B, K * C).mul_(col_scale)
