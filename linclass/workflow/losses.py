"""The classic linear classifiers' losses: multiclass SVM and softmax, each as loops
(naive), torch ops (vectorized, the classic reference) and linclass's fused linear + loss
ops (fused: scores, loss and dW from one read of X, never an N x C matrix).

Conventions of the classic assignment (CS231n / EECS 498-007): W is (D, C), X (N, D),
y (N,) int64; every loss returns (loss, dW) with loss = mean data loss over N
+ reg * sum(W * W), so dW includes 2 * reg * W.  The SVM uses margin 1 and sums over
the wrong classes (torch's multi_margin_loss times C).
"""

from __future__ import annotations

import torch

import linclass

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
    """loss and dW through linclass's public fused linear + loss op (only W's gradient)."""
    C = W.shape[1]
    Wt = W.t().detach().requires_grad_()
    with torch.enable_grad():
        if kind == "svm":
            # torch's hinge divides by C; the classic one sums over the wrong classes.
            loss = linclass.linear_multi_margin_loss(X, Wt, y.to(torch.int64)) * C
        else:
            loss = linclass.linear_cross_entropy(X, Wt, y.to(torch.int64))
        (dWt,) = torch.autograd.grad(loss, Wt)
    return loss.detach() + reg * torch.sum(W * W), dWt.t() + 2 * reg * W


def svm_loss_fused(W, X, y, reg):
    """Multiclass SVM loss from linclass's fused kernels: linear_multi_margin_loss * C."""
    return _fused("svm", W, X, y, reg)


def softmax_loss_fused(W, X, y, reg):
    """Softmax loss from linclass's fused kernels: linear_cross_entropy."""
    return _fused("softmax", W, X, y, reg)


# The family of each loss function (workflow/sweep.py batches the SVM and softmax losses).
LOSS_KINDS = {svm_loss_naive: "svm", svm_loss_vectorized: "svm", svm_loss_fused: "svm",
              softmax_loss_naive: "softmax", softmax_loss_vectorized: "softmax",
              softmax_loss_fused: "softmax"}
