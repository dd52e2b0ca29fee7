"""A two-layer ReLU network with a softmax loss, in the classic assignment's API.

    scores = relu(X W1 + b1) W2 + b2,   loss = mean_i CE(scores_i, y_i) + reg (|W1|^2 + |W2|^2)

The last layer and the loss are one call of linclass.linear_cross_entropy: the scores and
d loss / d scores are made a block of rows at a time and never stored whole; dW2, db2 and
d loss / d hidden come back from that call, and the first layer's gradients follow by hand.
Everything follows the tensors' device and dtype.
"""

from __future__ import annotations

import torch

from linclass import linear_cross_entropy
from . import parallel
from .data import refit_split
from .linear_classifier import _accuracy, sample_batch
from .utils import default_device, load_checkpoint

PARAM_KEYS = ("W1", "b1", "W2", "b2")


def nn_forward_pass(params: dict, X: torch.Tensor):
    """(scores (N, C), hidden (N, H)) of the network for X (N, D)."""
    hidden = torch.relu(torch.addmm(params["b1"], X, params["W1"]))
    scores = torch.addmm(params["b2"], hidden, params["W2"])
    return scores, hidden


def nn_forward_backward(params: dict, X: torch.Tensor, y: torch.Tensor | None = None,
                        reg: float = 0.0):
    """Scores when y is None, else (loss, grads) with grads for W1, b1, W2, b2.

    loss = mean softmax cross-entropy + reg * (sum W1^2 + sum W2^2); biases are not
    regularized."""
    W1, b1, W2, b2 = (params[k] for k in PARAM_KEYS)
    hidden = torch.relu(torch.addmm(b1, X, W1))
    if y is None:
        return torch.addmm(b2, hidden, W2)
    with torch.enable_grad():
        h = hidden.detach().requires_grad_()
        w2t = W2.detach().t().requires_grad_()  # (C, H) view of W2, no copy
        b2_ = b2.detach().requires_grad_()
        data_loss = linear_cross_entropy(h, w2t, y, bias=b2_)
        dh, dw2t, db2 = torch.autograd.grad(data_loss, (h, w2t, b2_))
    w1, w2 = W1.reshape(-1), W2.reshape(-1)
    loss = data_loss.detach() + reg * (torch.dot(w1, w1) + torch.dot(w2, w2))  # no W-sized temporary
    dh = dh.masked_fill_(hidden <= 0, 0.0)  # through the ReLU
    grads = {
        "W1": torch.addmm(W1, X.t(), dh, beta=2 * reg),
        "b1": dh.sum(0),
        "W2": dw2t.t() + 2 * reg * W2,
        "b2": db2,
    }
    return loss, grads


def nn_predict(params: dict, loss_func, X: torch.Tensor) -> torch.Tensor:
    """Predicted class per row of X (argmax of the scores)."""
    return loss_func(params, X).argmax(dim=1)


def nn_train(params: dict, loss_func, pred_func, X, y, X_val, y_val, learning_rate=1e-3,
             learning_rate_decay=0.95, reg=5e-6, num_iters=100, batch_size=200, verbose=False,
             progress=None, momentum=0.0, nesterov=False, augment=None, data_parallel=False):
    """Minibatch SGD.  Once per epoch (max(num_train // batch_size, 1) iterations, and at
    iteration 0) it records the minibatch's and the validation accuracy, then decays the
    learning rate.  Returns {"loss_history", "train_acc_history", "val_acc_history"}
    (accuracies as fractions, as in the classic code).  `progress(it)` is called after
    each iteration when given (the CLI's progress bar).

    momentum > 0: SGD with momentum, v = momentum * v - lr * grad, then p += v (or, with
    nesterov, p += momentum * v - lr * grad: the step looks ahead along v).  The defaults
    are the classic plain SGD.  augment: a function applied to each minibatch's rows
    before the step (e.g. data.random_crop_flip), None for the rows as they are.

    data_parallel: inside a torch.distributed group (workflow/parallel.py), every rank
    draws the same minibatch, computes the gradient of its share of the rows, and the
    shares are summed in one all-reduce: each step is the one-process step (every rank
    must call with the same arguments and seed)."""
    if momentum < 0 or momentum >= 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    rows = parallel.rank_rows(batch_size) if data_parallel and parallel.size() > 1 else None
    num_train = X.shape[0]
    per_epoch = max(num_train // batch_size, 1)
    loss_history, train_acc_history, val_acc_history = [], [], []
    velocity = {key: torch.zeros_like(params[key]) for key in PARAM_KEYS} if momentum else None
    for it in range(num_iters):
        X_batch, y_batch = sample_batch(X, y, num_train, batch_size)
        if augment is not None:
            X_batch = augment(X_batch)
        if rows is None:
            loss, grads = loss_func(params, X_batch, y=y_batch, reg=reg)
        else:
            loss, grads = _data_parallel_step(loss_func, params, X_batch, y_batch, reg, rows)
        loss_history.append(loss.item())
        for key in PARAM_KEYS:
            if velocity is None:
                params[key].add_(grads[key], alpha=-learning_rate)
                continue
            v = velocity[key].mul_(momentum).add_(grads[key], alpha=-learning_rate)
            if nesterov:
                params[key].add_(v, alpha=momentum).add_(grads[key], alpha=-learning_rate)
            else:
                params[key].add_(v)
        if verbose and it % 100 == 0:
            print(f"iteration {it} / {num_iters}: loss {loss.item():f}")
        if it % per_epoch == 0:
            train_acc = (pred_func(params, loss_func, X_batch) == y_batch).float().mean().item()
            train_acc_history.append(train_acc)
            if X_val is not None:  # None: no validation split (a refit trains on it)
                val_acc = (pred_func(params, loss_func, X_val) == y_val).float().mean().item()
                val_acc_history.append(val_acc)
            learning_rate *= learning_rate_decay
        if progress is not None:
            progress(it)
    return {"loss_history": loss_history, "train_acc_history": train_acc_history,
            "val_acc_history": val_acc_history}


def _data_parallel_step(loss_func, params, X_batch, y_batch, reg, rows):
    """The loss and gradients of the whole minibatch from this rank's rows: each rank's
    mean (and its reg term) weighted by its share of the rows, summed over the ranks."""
    share = (rows.stop - rows.start) / X_batch.shape[0]
    loss, grads = loss_func(params, X_batch[rows], y=y_batch[rows], reg=reg)
    bucket = [loss.reshape(1) * share] + [grads[key].mul_(share) for key in PARAM_KEYS]
    parallel.allreduce_sum_(bucket)
    return bucket[0][0], grads


def nn_get_search_params():
    """(hidden_sizes, regularization_strengths, learning_rates, learning_rate_decays) of
    the default search for photos (3 configurations of SEARCH_ITERS iterations), for
    minibatches shifted and mirrored at random (data.random_crop_flip, the CLI's default
    for this net on photos).  That augmentation keeps gaining from longer runs, so the
    search spends its time on a few long runs and varies the regularization, which the
    augmentation interacts with; the runs behind it: docs/cifar10.md."""
    return [1024], [2.5e-4, 5e-4, 1e-3], [1.0], [0.95]


def nn_get_digits_search_params():
    """The default search's grid for the digits (the CLI's --search there): around the
    digits defaults (hidden 256, Nesterov momentum 0.9, shifted minibatches), which
    5-fold cross-validation on the non-test images chose."""
    return [256], [1e-4, 1e-3], [0.1, 0.3], [0.99]


SEARCH_ITERS = 12000


def find_best_net(data_dict: dict, get_param_set_fn, num_iters: int = SEARCH_ITERS,
                  batch_size: int = 200, seed: int = 0, progress=None, *, augment_data=None,
                  refit: bool = False, init_std: float = 1e-4, distribute: bool = False,
                  **train_options):
    """Train one net per configuration of get_param_set_fn() and keep the best on the
    validation split.  Returns (best_net, best_stat, best_val_acc), best_val_acc in
    percent.  `progress(done, total, config, val_acc)` is called after each run.

    augment_data: a function data dict -> data dict applied to the training data (e.g.
    data.mirror_augment).  refit: train the chosen configuration again on the training
    and validation splits together (augmented the same way) for the same number of
    epochs; best_net and best_stat are then the refit's (its stat has no validation
    history), best_val_acc stays the search's.  init_std and train_options (momentum,
    nesterov, augment: see nn_train) apply to every run.

    distribute: inside a torch.distributed group, configuration i runs on rank i mod K;
    every rank gets the same winner (ties go to the earlier configuration, as in one
    process).  The refit then runs whole on rank 0 with the node's threads and is sent to
    the others (parallel.on_main), so the model is the one-process search's (a
    data-parallel refit sums its gradients in another order, which moves the test
    accuracy by an image or so)."""
    train_data = augment_data(data_dict) if augment_data is not None else data_dict
    X_train, y_train = train_data["X_train"], train_data["y_train"]
    X_val, y_val = data_dict["X_val"], data_dict["y_val"]
    hidden_sizes, regs, lrs, decays = get_param_set_fn()
    configs = [(h, r, lr, d) for h in hidden_sizes for r in regs for lr in lrs for d in decays]
    C = int(max(y_train.max(), y_val.max()).item()) + 1

    def train_one(X, y, Xv, yv, hidden, reg, lr, decay, iters):
        torch.manual_seed(seed)
        net = TwoLayerNet(X.shape[1], hidden, C, dtype=X.dtype, device=X.device, std=init_std)
        stat = net.train(X, y, Xv, yv, learning_rate=lr, learning_rate_decay=decay, reg=reg,
                         num_iters=iters, batch_size=batch_size, **train_options)
        stat["config"] = {"hidden_size": hidden, "reg": reg, "learning_rate": lr,
                          "learning_rate_decay": decay}
        return net, stat

    mine = parallel.my_share(configs) if distribute else list(enumerate(configs))
    results, best_net = [], None  # results: (index, val_acc, stat); best_net: this rank's best
    for done, (i, config) in enumerate(mine):
        net, stat = train_one(X_train, y_train, X_val, y_val, *config, num_iters)
        val_acc = _accuracy(net.predict(X_val), y_val)
        if best_net is None or val_acc > max(r[1] for r in results):
            best_net = net
        results.append((i, val_acc, stat))
        if progress is not None:
            progress(done + 1, len(mine), stat["config"], val_acc)
    if distribute:
        results = sorted(r for part in parallel.gather(results) for r in part)
    best_i, best_val_acc, best_stat = max(results, key=lambda r: (r[1], -r[0]))
    if refit:
        refit_data, iters = refit_split(data_dict, train_data, num_iters, augment_data)

        def run_refit():
            return train_one(refit_data["X_train"], refit_data["y_train"], None, None,
                             *configs[best_i], iters)

        def run_refit_to_cpu():
            net, stat = run_refit()
            return {key: net.params[key].cpu() for key in PARAM_KEYS}, stat

        if distribute:
            params, best_stat = parallel.on_main(run_refit_to_cpu)
            best_net = TwoLayerNet(X_train.shape[1], configs[best_i][0], C, dtype=X_train.dtype,
                                   device=X_train.device)
            best_net.params.update({key: params[key].to(X_train.device) for key in PARAM_KEYS})
        else:
            best_net, best_stat = run_refit()
        best_stat["refit"] = {"num_iters": iters, "n_train": len(refit_data["y_train"])}
    elif distribute:
        owner = best_i % parallel.size()
        if parallel.rank() != owner:
            best_net = TwoLayerNet(X_train.shape[1], configs[best_i][0], C, dtype=X_train.dtype,
                                   device=X_train.device)
        parallel.broadcast_([best_net.params[key] for key in PARAM_KEYS], owner)
    return best_net, best_stat, best_val_acc


class TwoLayerNet:
    """Weights W1 (D, H), b1 (H,), W2 (H, C), b2 (C,) in `params`; W ~ std * randn."""

    def __init__(self, input_size, hidden_size, output_size, dtype=torch.float32, device=None,
                 std=1e-4):
        device = default_device() if device is None else torch.device(device)
        self.params = {
            "W1": std * torch.randn(input_size, hidden_size, dtype=dtype, device=device),
            "b1": torch.zeros(hidden_size, dtype=dtype, device=device),
            "W2": std * torch.randn(hidden_size, output_size, dtype=dtype, device=device),
            "b2": torch.zeros(output_size, dtype=dtype, device=device),
        }

    def loss(self, X, y=None, reg=0.0):
        return nn_forward_backward(self.params, X, y, reg)

    def train(self, X, y, X_val, y_val, learning_rate=1e-3, learning_rate_decay=0.95, reg=5e-6,
              num_iters=100, batch_size=200, verbose=False, progress=None, momentum=0.0,
              nesterov=False, augment=None, data_parallel=False):
        return nn_train(self.params, nn_forward_backward, nn_predict, X, y, X_val, y_val,
                        learning_rate, learning_rate_decay, reg, num_iters, batch_size, verbose,
                        progress, momentum, nesterov, augment, data_parallel)

    def predict(self, X):
        return nn_predict(self.params, nn_forward_backward, X)

    def save(self, path):
        torch.save(self.params, path)
        print(f"Saved in {path}")

    def load(self, path):
        """Load params saved by save(); checks the keys and the shapes against this net."""
        params = load_checkpoint(path, "a TwoLayerNet checkpoint")
        if not isinstance(params, dict) or set(params) != set(PARAM_KEYS):
            got = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"{path} is not a TwoLayerNet checkpoint: expected keys "
                             f"{list(PARAM_KEYS)}, got {got}")
        for key in PARAM_KEYS:
            want = tuple(self.params[key].shape)
            if tuple(params[key].shape) != want:
                raise ValueError(f"{path}: {key} has shape {tuple(params[key].shape)}, this net "
                                 f"needs {want}")
            self.params[key] = params[key].to(self.params[key])
        print(f"load checkpoint file: {path}")
