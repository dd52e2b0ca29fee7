"""The classifier workflow against the seed-style torch code, on CIFAR-10 shapes.

Groups:
  train LinearSVM 1500it 40000x3073   1500 SGD steps, batch 200: the seed's loop (its
      train_linear_classifier and sample_batch as written, with svm_loss_vectorized:
      X[idx], X W, the hinge, X^T dS) as "torch", against LinearSVM().train (one fused
      C++ call per step) as linclass[cpp]
  sweep 25 configs 40000x3073   5 x 5 (lr, reg) pairs, SWEEP_ITERS steps each, then train
      and validation accuracy: the classic notebook loop (25 sequential runs of the seed
      trainer) as "torch", 25 sequential test_one_param_set(LinearSVM()) on linclass's
      fused trainer as linclass[sequential], and linclass.workflow.sweep.sweep
      (all pairs at once) as linclass[sweep].  SWEEP_ITERS defaults to 2000, the
      notebook's (test_one_param_set's default); LINCLASS_BENCH_SWEEP_ITERS=300 gives a
      quicker run in which the accuracy passes (the same work for any number of steps)
      weigh more
The data is random with CIFAR-10's shapes (40000 x 3073 train, 10000 x 3073 val, 10
classes): speed does not depend on the pixels.
"""

import os

import pytest
import torch

from linclass.workflow import linear_classifier as lc
from linclass.workflow import sweep as sw

SWEEP_ITERS = int(os.environ.get("LINCLASS_BENCH_SWEEP_ITERS", "2000"))
LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
REGS = [1e-4, 1e-3, 5e-3, 1e-2, 5e-2]


def seed_sample_batch(X, y, num_train, batch_size):
    """The seed's sample_batch as written: advanced indexing.  linclass.sample_batch
    draws the same indices but gathers with index_select, ~2x faster on this CPU; that
    is one of linclass's improvements, so the baseline does not get it."""
    indices = torch.randint(num_train, (batch_size,))
    return X[indices], y[indices]


class SeedSVM(lc.LinearClassifier):
    """The seed's LinearSVM: the vectorized torch loss (the same math as
    lc.svm_loss_vectorized) in the seed's SGD loop, line for line."""

    def loss(self, W, X_batch, y_batch, reg):
        return lc.svm_loss_vectorized(W, X_batch, y_batch, reg)

    def train(self, X_train, y_train, learning_rate=1e-3, reg=1e-5, num_iters=100,
              batch_size=200, verbose=False):
        num_train, dim = X_train.shape
        W = self.W
        if W is None:
            num_classes = torch.max(y_train) + 1
            W = 0.000001 * torch.randn(dim, num_classes, device=X_train.device, dtype=X_train.dtype)
        loss_history = []
        for it in range(num_iters):
            X_batch, y_batch = seed_sample_batch(X_train, y_train, num_train, batch_size)
            loss, grad = self.loss(W, X_batch, y_batch, reg)
            loss_history.append(loss.item())
            W -= learning_rate * grad
        self.W = W
        return loss_history


@pytest.fixture(scope="module")
def cifar_like():
    g = torch.Generator().manual_seed(0)
    X = torch.rand(50000, 3073, generator=g) - 0.5
    X[:, -1] = 1.0
    y = torch.randint(0, 10, (50000,), generator=g)
    return {"X_train": X[:40000], "y_train": y[:40000], "X_val": X[40000:], "y_val": y[40000:]}


@pytest.mark.parametrize("impl", ["torch", "linclass[cpp]"])
def test_train_linear_svm(benchmark, cifar_like, impl):
    d = cifar_like
    benchmark.group = "train LinearSVM 1500it 40000x3073"
    benchmark.extra_info.update(impl=impl, bytes=0)
    cls = SeedSVM if impl == "torch" else lc.LinearSVM
    benchmark.pedantic(lambda: cls().train(d["X_train"], d["y_train"], 1e-3, 1e-4, 1500, 200),
                       rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["torch", "linclass[sequential]", "linclass[sweep]"])
def test_sweep_25_configs(benchmark, cifar_like, impl):
    d = cifar_like
    benchmark.group = "sweep 25 configs 40000x3073"
    benchmark.extra_info.update(impl=impl, bytes=0, iters=SWEEP_ITERS)

    def sequential(cls):
        return [lc.test_one_param_set(cls(), d, lr, reg, num_iters=SWEEP_ITERS)[1:]
                for lr in LRS for reg in REGS]

    run = {"torch": lambda: sequential(SeedSVM),
           "linclass[sequential]": lambda: sequential(lc.LinearSVM),
           "linclass[sweep]": lambda: sw.sweep(lc.LinearSVM, d, LRS, REGS, num_iters=SWEEP_ITERS)}[impl]
    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
