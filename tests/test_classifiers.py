"""The classifier workflow: linear classifiers, the two-layer net, the sweep, save/load."""

import functools
import math

import pytest
import torch

import linclass
from linclass import _ops
from linclass.workflow import linear_classifier as lc
from linclass.workflow import data
from linclass.workflow import sweep as sw
from linclass.workflow import two_layer_net as tln
from linclass.workflow.data import load_digits
from linclass.workflow.grad import compute_numeric_gradient, grad_check_sparse, rel_error
from linclass.workflow.utils import get_toy_data, reset_seed

LOSSES = {
    "svm": (lc.svm_loss_naive, lc.svm_loss_vectorized, lc.svm_loss_fused),
    "softmax": (lc.softmax_loss_naive, lc.softmax_loss_vectorized, lc.softmax_loss_fused),
}


def _problem(n=13, d=20, c=7, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = 0.01 * torch.randn(d, c, generator=g, dtype=dtype)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    return W, X, y


@pytest.fixture(scope="module")
def digits64():
    return load_digits(dtype=torch.float64, device="cpu")


@pytest.mark.parametrize("kind", ["svm", "softmax"])
@pytest.mark.parametrize("shape", [(1, 5, 1), (13, 20, 7), (40, 33, 10), (9, 8, 17)])
def test_naive_vectorized_fused_agree(kind, shape):
    n, d, c = shape
    W, X, y = _problem(n, d, c)
    ref_loss, ref_grad = LOSSES[kind][0](W, X, y, 0.1)
    for fn in LOSSES[kind][1:]:
        loss, grad = fn(W, X, y, 0.1)
        assert abs(float(loss) - float(ref_loss)) < 1e-6, fn.__name__
        assert (grad - ref_grad).abs().max() < 1e-6, fn.__name__


def test_svm_margins_are_summed_over_wrong_classes():
    # scores of one example: x W = [1, 0, 3] with target 0 -> max(0, 0-1+1) + max(0, 3-1+1) = 3
    W = torch.tensor([[1.0, 0.0, 3.0]], dtype=torch.float64)
    X = torch.ones(1, 1, dtype=torch.float64)
    for fn in LOSSES["svm"]:
        loss, _ = fn(W, X, torch.tensor([0]), 0.0)
        assert float(loss) == pytest.approx(3.0)


@pytest.mark.parametrize("kind", ["svm", "softmax"])
def test_numeric_gradient(kind):
    W, X, y = _problem(30, 15, 6)
    W += 0.05 * torch.randn_like(W)
    for fn in LOSSES[kind]:
        _, grad = fn(W, X, y, 0.05)
        numeric = compute_numeric_gradient(lambda w: fn(w, X, y, 0.05)[0], W.clone())
        assert rel_error(grad, numeric) < 1e-5, fn.__name__
        grad_check_sparse(lambda w: fn(w, X, y, 0.05)[0], W.clone(), grad, num_checks=3)


def test_softmax_is_stable_on_real_scale_data():
    # W = 1 gives every class the same score, whatever the (pixel-scale) inputs: the data
    # loss is log(10) and the regularization 2.5e4 * 3073 * 10.
    W = torch.ones(3073, 10, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, 256, (50, 3073), generator=g).double()
    y = torch.randint(0, 10, (50,), generator=g)
    for fn in LOSSES["softmax"]:
        loss, grad = fn(W, X, y, 2.5e4)
        assert float(loss) == pytest.approx(768250002.302585, rel=1e-14, abs=1e-6), fn.__name__
        assert torch.isfinite(grad).all()
    # and huge, unequal scores stay finite
    loss, grad = lc.softmax_loss_fused(W + torch.randn(3073, 10, generator=g, dtype=torch.float64),
                                       X, y, 0.0)
    assert math.isfinite(float(loss)) and torch.isfinite(grad).all()


def test_training_reduces_the_loss_and_predicts(digits64):
    d = digits64
    for cls in (lc.LinearSVM, lc.Softmax):
        model = cls()
        history = model.train(d["X_train"], d["y_train"], learning_rate=0.1, reg=1e-3, num_iters=300)
        assert len(history) == 300 and history[-1] < history[0]
        pred = model.predict(d["X_val"])
        assert pred.shape == d["y_val"].shape and pred.dtype == torch.int64
        assert (pred == d["y_val"]).double().mean() > 0.85


def test_fast_trainer_matches_the_generic_loop():
    # float32 on CPU takes the one-C++-call-per-step path; the float64 loop is the reference.
    d = load_digits(dtype=torch.float32, device="cpu")
    for kind, cls in (("svm", lc.LinearSVM), ("softmax", lc.Softmax)):
        fast = cls()
        fast.train(d["X_train"], d["y_train"], learning_rate=0.05, reg=1e-3, num_iters=200)
        reset_seed(0)
        W0 = 0.000001 * torch.randn(d["X_train"].shape[1], 10)
        W, _ = lc.train_linear_classifier(LOSSES[kind][1], W0.double(), d["X_train"].double(),
                                          d["y_train"], learning_rate=0.05, reg=1e-3, num_iters=200)
        # float32 vs float64: a hinge term whose margin sits at the kink can flip (one
        # example's lr * x / batch ~ 1e-4 here); the softmax has no kink.
        tol = 5e-3 if kind == "svm" else 1e-4
        assert (fast.W.double() - W).abs().max() < tol * W.abs().max()


def test_sample_batch_draws_with_replacement():
    X = torch.arange(10.0)[:, None]
    y = torch.arange(10)
    torch.manual_seed(0)
    xb, yb = lc.sample_batch(X, y, 10, 64)
    assert xb.shape == (64, 1) and (xb[:, 0].long() == yb).all()
    assert len(set(yb.tolist())) < 64  # repeats


def test_sweep_equals_sequential_runs(digits64):
    d = digits64
    lrs, regs = [0.05, 0.2], [1e-4, 1e-2]
    for cls in (lc.LinearSVM, lc.Softmax):
        out = sw.sweep(cls, d, lrs, regs, num_iters=150)
        for lr in lrs:
            for reg in regs:
                _, train_acc, val_acc = lc.test_one_param_set(cls(), d, lr, reg, num_iters=150)
                got_train, got_val = out["results"][(lr, reg)]
                assert abs(got_train - train_acc) < 0.1 and abs(got_val - val_acc) < 0.1
        best = max(out["results"].items(), key=lambda kv: kv[1][1])
        assert out["best"] == best[0] and out["best_val"] == best[1][1]
        acc = 100 * (out["best_model"].predict(d["X_val"]) == d["y_val"]).double().mean().item()
        assert abs(acc - out["best_val"]) < 1e-9


# The sweep's weights themselves (not only its accuracies) are the sequential trainer's,
# for a mild, a strong (1 - 2 lr reg = 0.2) and a negative weight decay.
@pytest.mark.parametrize("lr,reg", [(0.05, 1e-3), (0.2, 2.0), (0.2, 5.0)])
@pytest.mark.parametrize("cls", [lc.LinearSVM, lc.Softmax])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sweep_weights_equal_sequential_training(cls, lr, reg, dtype):
    d = load_digits(dtype=dtype, device="cpu")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    trained = {}
    for rate in (lr, lr / 2):
        model = cls()
        model.train(d["X_train"], d["y_train"], learning_rate=rate, reg=reg, num_iters=60,
                    batch_size=50)
        trained[rate] = model.W
        alone = sw.sweep(cls, d, [rate], [reg], num_iters=60, batch_size=50)["best_model"].W
        assert alone.dtype == dtype
        assert (alone - model.W).abs().max() <= tol * model.W.abs().max()
    # two pairs side by side (each in its own column block, with its own decay): the best one's W
    both = sw.sweep(cls, d, [lr, lr / 2], [reg], num_iters=60, batch_size=50)
    W = trained[both["best"][0]]
    assert (both["best_model"].W - W).abs().max() <= tol * W.abs().max()


@pytest.mark.skipif("cpp" not in linclass.backends.available(), reason="needs linclass._C")
def test_sweep_step_in_cpp_equals_the_python_loop(monkeypatch):
    # On CPU float32 each sweep step is one linclass.sgd.linear_sgd_sweep_step call; the
    # Python loop (every other device and dtype) is its reference.
    d = load_digits(dtype=torch.float32, device="cpu")
    calls = []
    step = linclass.sgd.linear_sgd_sweep_step
    monkeypatch.setattr(linclass.sgd, "linear_sgd_sweep_step",
                        lambda *args: calls.append(1) or step(*args))
    for cls in (lc.LinearSVM, lc.Softmax):
        args = (cls, d, [0.05, 0.2], [1e-3, 2.0])
        calls.clear()
        fast = sw.sweep(*args, num_iters=40, batch_size=50)
        assert len(calls) == 40
        with monkeypatch.context() as m:
            m.setattr(sw, "_fast_path_ok", lambda *a: False)
            slow = sw.sweep(*args, num_iters=40, batch_size=50)
        assert len(calls) == 40 and fast["best"] == slow["best"]
        W = slow["best_model"].W
        assert (fast["best_model"].W - W).abs().max() <= 1e-5 * W.abs().max()
        for pair, (train_acc, val_acc) in slow["results"].items():
            assert abs(fast["results"][pair][0] - train_acc) < 0.1
            assert abs(fast["results"][pair][1] - val_acc) < 0.1


@pytest.mark.skipif("cpp" not in linclass.backends.available(), reason="needs linclass._C")
def test_sweep_step_rejects_bad_arguments():
    # The raw op through _ops.call_cpp, as linclass.sgd calls it: a stable-ABI kernel
    # raises RuntimeError, tagged when torch would raise IndexError.
    step = functools.partial(_ops.call_cpp, torch.ops.linclass.linear_sgd_sweep_step)
    X, y, W = torch.randn(20, 5), torch.randint(0, 3, (20,)), torch.zeros(5, 6)
    idx, ones = torch.tensor([0, 19]), torch.ones(6)
    step(X, W, y, idx, 1, 2, ones, ones)  # two runs of three classes
    with pytest.raises(IndexError, match="out of range"):
        step(X, W, y, torch.tensor([0, 20]), 1, 2, ones, ones)
    with pytest.raises(RuntimeError, match="one per column"):
        step(X, W, y, idx, 1, 2, torch.ones(5), ones)
    with pytest.raises(RuntimeError, match="cannot hold 4 runs"):
        step(X, W, y, idx, 1, 4, ones, ones)
    with pytest.raises(IndexError, match="out of bounds"):
        step(X, W, torch.full((20,), 3), idx, 0, 2, ones, ones)  # a label past C = 3
    with pytest.raises(RuntimeError, match="contiguous float32"):
        step(X.double(), W, y, idx, 1, 2, ones, ones)


def test_sweep_with_a_plain_loss_function(digits64):
    d = digits64
    a = sw.sweep(lc.svm_loss_vectorized, d, [0.1], [1e-3], num_iters=50, batch_size=50)
    b = sw.sweep(lc.LinearSVM, d, [0.1], [1e-3], num_iters=50, batch_size=50)
    assert (a["best_model"] - b["best_model"].W).abs().max() < 1e-10


def test_linear_save_load_round_trip(tmp_path, digits64):
    d = digits64
    model = lc.Softmax()
    model.train(d["X_train"], d["y_train"], learning_rate=0.1, num_iters=20)
    model.save(tmp_path / "m.pt")
    other = lc.Softmax()
    other.load(tmp_path / "m.pt")
    assert torch.equal(other.W, model.W)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        other.load(tmp_path / "bad.pt")
    torch.save({"V": torch.zeros(2)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="not a linear classifier checkpoint"):
        other.load(tmp_path / "wrong.pt")


# ---- the two-layer net --------------------------------------------------------------------


def test_toy_net_loss_and_scores():
    X, y, params = get_toy_data(dtype=torch.float64, device="cpu")
    loss, grads = tln.nn_forward_backward(params, X, y, reg=0.05)
    assert float(loss) == pytest.approx(1.0986121892929077, abs=1e-6)  # ~ log 3 with tiny weights
    scores = tln.nn_forward_backward(params, X)
    ref_hidden = torch.relu(X @ params["W1"] + params["b1"])
    assert torch.allclose(scores, ref_hidden @ params["W2"] + params["b2"])
    assert set(grads) == {"W1", "b1", "W2", "b2"}


def test_net_gradients_numerically():
    X, y, params = get_toy_data(dtype=torch.float64, device="cpu")
    for p in params.values():  # weights large enough that the check means something
        p.copy_(torch.randn_like(p) * 0.5)
    for reg in (0.0, 0.05):
        _, grads = tln.nn_forward_backward(params, X, y, reg=reg)
        for key in tln.PARAM_KEYS:
            def f(v, key=key):
                saved = params[key]
                params[key] = v
                out = tln.nn_forward_backward(params, X, y, reg=reg)[0]
                params[key] = saved
                return out

            numeric = compute_numeric_gradient(f, params[key].clone(), h=1e-6)
            assert rel_error(grads[key], numeric) < 1e-4, (key, reg)


def test_net_agrees_with_autograd_on_odd_shapes():
    g = torch.Generator().manual_seed(3)
    for n, d, h, c in [(1, 3, 2, 1), (7, 5, 9, 4), (33, 12, 6, 17)]:
        p = {"W1": torch.randn(d, h, generator=g, dtype=torch.float64),
             "b1": torch.randn(h, generator=g, dtype=torch.float64),
             "W2": torch.randn(h, c, generator=g, dtype=torch.float64),
             "b2": torch.randn(c, generator=g, dtype=torch.float64)}
        X = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = torch.randint(0, c, (n,), generator=g)
        loss, grads = tln.nn_forward_backward(p, X, y, reg=0.3)
        leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
        s = torch.relu(X @ leaves["W1"] + leaves["b1"]) @ leaves["W2"] + leaves["b2"]
        ref = torch.nn.functional.cross_entropy(s, y) + 0.3 * ((leaves["W1"] ** 2).sum() + (leaves["W2"] ** 2).sum())
        ref.backward()
        assert torch.allclose(loss, ref.detach())
        for k in tln.PARAM_KEYS:
            assert torch.allclose(grads[k], leaves[k].grad), k


def test_toy_net_trains():
    X, y, params = get_toy_data(dtype=torch.float64, device="cpu")
    stats = tln.nn_train(params, tln.nn_forward_backward, tln.nn_predict, X, y, X, y,
                         learning_rate=1e-1, reg=1e-6, num_iters=200)
    assert stats["loss_history"][-1] < 1.0
    assert len(stats["loss_history"]) == 200
    # one epoch = max(5 // 200, 1) = 1 iteration: accuracy recorded every iteration
    assert len(stats["train_acc_history"]) == 200 == len(stats["val_acc_history"])


def test_two_layer_net_class_and_checkpoint(tmp_path, digits64):
    d = digits64
    torch.manual_seed(0)
    net = tln.TwoLayerNet(64, 32, 10, dtype=torch.float64, device="cpu")
    stats = net.train(d["X_train"], d["y_train"], d["X_val"], d["y_val"], learning_rate=1.0,
                      reg=1e-4, num_iters=400, batch_size=100)
    per_epoch = len(d["y_train"]) // 100
    assert len(stats["val_acc_history"]) == math.ceil(400 / per_epoch)
    assert (net.predict(d["X_val"]) == d["y_val"]).double().mean() > 0.8
    net.save(tmp_path / "net.pt")
    other = tln.TwoLayerNet(64, 32, 10, dtype=torch.float64, device="cpu")
    other.load(tmp_path / "net.pt")
    assert all(torch.equal(other.params[k], net.params[k]) for k in tln.PARAM_KEYS)
    with pytest.raises(ValueError, match="W1 has shape"):
        tln.TwoLayerNet(64, 16, 10, device="cpu").load(tmp_path / "net.pt")
    torch.save({"W1": torch.zeros(1)}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="expected keys"):
        other.load(tmp_path / "partial.pt")


def test_find_best_net_keeps_the_best(digits64):
    d = digits64
    seen = []
    net, stat, val = tln.find_best_net(d, lambda: ([16], [1e-4], [0.05, 1.0], [0.95]),
                                       num_iters=200, progress=lambda i, n, cfg, acc: seen.append(acc))
    assert len(seen) == 2 and val == max(seen)
    assert stat["config"]["learning_rate"] in (0.05, 1.0)
    assert abs(100 * (net.predict(d["X_val"]) == d["y_val"]).double().mean().item() - val) < 1e-9


def test_search_params_sizes():
    for get in (lc.svm_get_search_params, lc.softmax_get_search_params):
        lrs, regs = get()
        assert 5 <= len(lrs) * len(regs) <= 25
    hs, regs, lrs, decays = tln.nn_get_search_params()
    assert len(hs) * len(regs) * len(lrs) * len(decays) >= 1


def test_nesterov_momentum_equals_the_update_written_out():
    X, y, params = get_toy_data(dtype=torch.float64, device="cpu")
    ref = {k: v.clone() for k, v in params.items()}
    lr, mu, iters = 0.05, 0.9, 7
    torch.manual_seed(3)
    tln.nn_train(params, tln.nn_forward_backward, tln.nn_predict, X, y, X, y, learning_rate=lr,
                 learning_rate_decay=1.0, reg=1e-3, num_iters=iters, batch_size=3, momentum=mu,
                 nesterov=True)
    torch.manual_seed(3)
    v = {k: torch.zeros_like(t) for k, t in ref.items()}
    for _ in range(iters):
        Xb, yb = lc.sample_batch(X, y, X.shape[0], 3)
        _, grads = tln.nn_forward_backward(ref, Xb, yb, reg=1e-3)
        for k in tln.PARAM_KEYS:  # v' = mu v - lr g;  p += -mu v + (1 + mu) v'
            v_new = mu * v[k] - lr * grads[k]
            ref[k] = ref[k] - mu * v[k] + (1 + mu) * v_new
            v[k] = v_new
    for k in tln.PARAM_KEYS:
        assert torch.allclose(params[k], ref[k], rtol=1e-12, atol=1e-12), k
    with pytest.raises(ValueError, match="momentum"):
        tln.nn_train(params, tln.nn_forward_backward, tln.nn_predict, X, y, X, y, momentum=1.0)


@pytest.mark.parametrize("cls", [lc.LinearSVM, lc.Softmax])
def test_sweep_refit_trains_the_winner_on_train_plus_val(cls, digits64):
    d = digits64
    out = sw.sweep(cls, d, [1e-2, 1e-1], [1e-3], num_iters=50, batch_size=40, refit=True)
    both = data.train_plus_val(d)
    n_all, n_train = len(both["y_train"]), len(d["y_train"])
    assert out["refit"] == {"num_iters": round(50 * n_all / n_train), "n_train": n_all}
    alone = sw.sweep(cls, both | {"X_val": d["X_val"], "y_val": d["y_val"]}, [out["best"][0]],
                     [out["best"][1]], num_iters=out["refit"]["num_iters"], batch_size=40)
    assert torch.allclose(out["best_model"].W, alone["best_model"].W, rtol=1e-5, atol=1e-7)
    plain = sw.sweep(cls, d, [1e-2, 1e-1], [1e-3], num_iters=50, batch_size=40)
    assert plain["best"] == out["best"] and plain["best_val"] == out["best_val"] and "refit" not in plain


def test_find_best_net_refit_and_train_options(digits64):
    d = digits64
    grid = lambda: ([16], [1e-4], [0.05, 0.3], [0.95])  # noqa: E731
    net, stat, val = tln.find_best_net(d, grid, num_iters=60, refit=True, momentum=0.9,
                                       nesterov=True, init_std=0.05)
    n_all = len(d["y_train"]) + len(d["y_val"])
    assert stat["refit"] == {"num_iters": round(60 * n_all / len(d["y_train"])), "n_train": n_all}
    assert stat["val_acc_history"] == [] and len(stat["loss_history"]) == stat["refit"]["num_iters"]
    _, kept_stat, kept_val = tln.find_best_net(d, grid, num_iters=60, momentum=0.9, nesterov=True,
                                               init_std=0.05)
    assert kept_val == val and kept_stat["config"] == stat["config"]
