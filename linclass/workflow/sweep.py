"""Batched hyperparameter search of the linear classifiers: every (learning rate, reg)
pair trained at once, their weights side by side in one (D, K * C) matrix."""

from __future__ import annotations

import torch

import linclass
from linclass import sgd

from . import parallel
from .data import refit_split
from .linear_classifier import (LinearClassifier, _fast_path_ok, _init_weight, sample_batch,
                                train_linear_classifier)
from .losses import LOSS_KINDS
from .utils import reset_seed


def _kind_of(model_cls_or_loss):
    if isinstance(model_cls_or_loss, type) and issubclass(model_cls_or_loss, LinearClassifier):
        return model_cls_or_loss.fused_kind, model_cls_or_loss
    return LOSS_KINDS.get(model_cls_or_loss), None


def sweep(model_cls_or_loss, data_dict, learning_rates, regs, num_iters=2000, batch_size=200,
          seed=0, progress=None, *, augment_data=None, refit=False, distribute=False):
    """Train every (learning rate, reg) pair at once.

    As in the classic search loop (a fresh LinearSVM()/Softmax() per pair reseeds, so every
    pair starts from the same W and draws the same minibatches), all pairs share W0 and
    the minibatch sequence; their weights sit side by side in one (D, K * C) matrix, so
    one wide product per step serves them all, and each pair's accuracy equals what
    test_one_param_set gives with the same seed (up to float rounding).

    model_cls_or_loss: LinearSVM, Softmax (or another LinearClassifier subclass), or a
    loss function (W, X, y, reg) -> (loss, dW); the SVM and softmax losses are batched,
    any other function is called once per pair and step on the shared minibatch.

    augment_data: a function data dict -> data dict applied to the training data before
    training (e.g. data.mirror_augment), None for none.  refit: after the search, train
    the chosen pair again, alone, on the training and validation splits together
    (data.train_plus_val, augmented the same way) for the same number of epochs; that
    model is "best_model".

    distribute: inside a torch.distributed group (workflow/parallel.py), pair i runs on
    rank i mod K (each rank its share side by side, from the same W0 and minibatches, so
    each pair's run is the one it has in one process); every rank returns all results
    and the same best_model.

    Returns {"results": {(lr, reg): (train_acc, val_acc)}, "best": (lr, reg),
             "best_val": val_acc, "best_model": a trained classifier (or W), and with
             refit "refit": {"num_iters", "n_train"}}.  Accuracies are measured on the
             splits as given (train_acc on the training split before augmentation).
    """
    kind, model_cls = _kind_of(model_cls_or_loss)
    train_data = augment_data(data_dict) if augment_data is not None else data_dict
    X, y = train_data["X_train"], train_data["y_train"]
    all_configs = [(lr, reg) for lr in learning_rates for reg in regs]  # the notebook's order
    mine = parallel.my_share(all_configs) if distribute else list(enumerate(all_configs))
    configs = [c for _, c in mine]
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
    # CPU float32: the whole step in one C++ call (linclass.sgd.linear_sgd_sweep_step, the
    # same math as the loop below and the same minibatches: one torch.randint per step).
    fast = kind is not None and _fast_path_ok(X, W, y)
    if fast:
        y_long = y.to(torch.int64).contiguous()
    for it in range(num_iters if K else 0):
        if fast:
            sgd.linear_sgd_sweep_step(X, W, y_long, torch.randint(num_train, (batch_size,)),
                                      kind, K, decay, step_scale)
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

    # (A rank with no pair to run, when there are more ranks than pairs, has none.)
    train_acc = accuracy(data_dict["X_train"], data_dict["y_train"]).tolist() if K else []
    val_acc = accuracy(data_dict["X_val"], data_dict["y_val"]).tolist() if K else []
    ran = [(i, train_acc[k], val_acc[k]) for k, (i, _) in enumerate(mine)]
    if distribute:
        ran = sorted(r for part in parallel.gather(ran) for r in part)
    results = {all_configs[i]: (t, v) for i, t, v in ran}
    best_i, _, best_val = max(ran, key=lambda r: (r[2], -r[0]))  # ties: the first pair
    out = {"results": results, "best": all_configs[best_i], "best_val": best_val}
    if refit:
        refit_data, iters = refit_split(data_dict, train_data, num_iters, augment_data)
        out["refit"] = {"num_iters": iters, "n_train": len(refit_data["y_train"])}

        def run_refit():
            return _train_one(model_cls_or_loss, model_cls, refit_data, *all_configs[best_i],
                              iters, batch_size, seed, progress)

        if distribute:  # once, on rank 0 with the node's threads (parallel.on_main)
            best_W = parallel.on_main(lambda: _weights(run_refit()).cpu()).to(W0.device)
        else:
            out["best_model"] = run_refit()
            return out
    elif distribute:
        owner = best_i % parallel.size()
        best_W = W0.clone() if parallel.rank() != owner else \
            W[:, C * [i for i, _ in mine].index(best_i):][:, :C].clone()
        parallel.broadcast_([best_W], owner)
    else:
        best_W = W[:, best_i * C:(best_i + 1) * C].clone()
    if model_cls is not None:
        out["best_model"] = model_cls()
        out["best_model"].W = best_W
    else:
        out["best_model"] = best_W
    return out


def _weights(model_or_W):
    return model_or_W if isinstance(model_or_W, torch.Tensor) else model_or_W.W


def _train_one(model_cls_or_loss, model_cls, data, lr, reg, num_iters, batch_size, seed, progress):
    """One (lr, reg) pair trained alone from the search's W0 and seed (the refit)."""
    X, y = data["X_train"], data["y_train"]
    if model_cls is not None:
        model = model_cls()
        reset_seed(seed)
        model.W = _init_weight(None, X, y)
        model.train(X, y, lr, reg, num_iters, batch_size, progress=progress)
        return model
    reset_seed(seed)
    W, _ = train_linear_classifier(model_cls_or_loss, None, X, y, lr, reg, num_iters, batch_size,
                                   progress=progress)
    return W


def _batched_dscores(kind, scores, y_batch, K, C, col_scale):
    """d(summed data loss)/d scores for K pairs side by side, scores (B, K * C), times
    `col_scale` (K * C,)."""
    B = scores.shape[0]
    rows = scores.view(B * K, C).detach().requires_grad_()  # row (b, k): pair k, example b
    targets = y_batch.to(torch.int64).repeat_interleave(K)
    with torch.enable_grad():
        loss = (linclass.multi_margin_loss(rows, targets, reduction="sum") if kind == "svm"
                else linclass.cross_entropy(rows, targets, reduction="sum"))
        (grad,) = torch.autograd.grad(loss, rows)
    return grad.view(B, K * C).mul_(col_scale)
