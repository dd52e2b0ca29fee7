"""The classifier workflow against the seed-style torch code, on CIFAR-10 shapes.

Groups:
  train LinearSVM 1500it 40000x3073   1500 SGD steps, batch 200: the seed's loop
      (train_linear_classifier with svm_loss_vectorized: X[idx], X W, the hinge, X^T dS)
      as "torch", against LinearSVM().train (one fused C++ call per step) as linclass[cpp]
  sweep 25 configs 40000x3073   5 x 5 (lr, reg) pairs, SWEEP_ITERS steps each, then train
      and validation accuracy: the classic notebook loop (25 sequential runs of the seed
      trainer) as "torch", 25 sequential test_one_param_set(LinearSVM()) on linclass's
      fused trainer as linclass[sequential], and linclass.linear_classifier.sweep
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

from linclass import linear_classifier as lc

SWEEP_ITERS = int(os.environ.get("LINCLASS_BENCH_SWEEP_ITERS", "2000"))
LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
REGS = [1e-4, 1e-3, 5e-3, 1e-2, 5e-2]


class SeedSVM(lc.LinearClassifier):
    """The seed's LinearSVM: the vectorized torch loss in the plain SGD loop."""

    def loss(self, W, X_batch, y_batch, reg):
        return lc.svm_loss_vectorized(W, X_batch, y_batch, reg)


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
           "linclass[sweep]": lambda: lc.sweep(lc.LinearSVM, d, LRS, REGS, num_iters=SWEEP_ITERS)}[impl]
    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
