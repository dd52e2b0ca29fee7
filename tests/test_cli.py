"""The command line and the data loaders, end to end on small data."""

import importlib.util
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from linclass.workflow import cli, data


needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="image folders need torchvision (the data extra)")


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "linclass", *args], capture_output=True,
                          text=True, timeout=300, **kw)


def _image_folder(root, classes, per_class=6, size=8, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            img[..., k % 3] += 150  # a class-coloured tint: learnable
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("model", ["svm", "softmax", "twolayer"])
def test_train_on_digits_writes_json_and_outputs(tmp_path, model):
    out, js = tmp_path / "out", tmp_path / "r.json"
    code = cli.main(["train", "--model", model, "--iters", "300", "--quiet", "--device", "cpu",
                     "--out", str(out), "--json", str(js)])
    assert code == 0
    r = json.loads(js.read_text())
    assert {"model", "dataset", "hyperparameters", "train_acc", "val_acc", "test_acc", "n_train",
            "n_val", "n_test", "seconds", "backend"} <= set(r)
    assert r["model"] == model and r["dataset"] == "digits" and r["hyperparameters"]["iters"] == 300
    assert r["n_train"] + r["n_val"] + r["n_test"] == 1797 and r["n_test"] > 0
    assert r["val_acc"] > 80 and 0 <= r["test_acc"] <= 100
    for name in ("model.pt", "loss.png", "weights.png", "results.json"):
        assert (out / name).stat().st_size > 0, name
    # the checkpoint loads back and evaluates to the same validation accuracy
    js2 = tmp_path / "r2.json"
    assert cli.main(["train", "--model", model, "--iters", "0", "--quiet", "--device", "cpu",
                     "--load", str(out / "model.pt"), "--json", str(js2)]) == 0
    assert json.loads(js2.read_text())["val_acc"] == pytest.approx(r["val_acc"])


def test_search_on_digits(tmp_path):
    js = tmp_path / "r.json"
    assert cli.main(["train", "--model", "svm", "--search", "--iters", "200", "--quiet",
                     "--device", "cpu", "--out", str(tmp_path), "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["search"] and len(r["search_results"]) >= 5
    assert r["val_acc"] == pytest.approx(max(s["val_acc"] for s in r["search_results"]))
    assert (tmp_path / "search.png").stat().st_size > 0


@needs_torchvision
def test_folder_dataset_end_to_end(tmp_path):
    classes = ["cat", "dog", "frog"]
    train = _image_folder(tmp_path / "train", classes, per_class=10)
    test = _image_folder(tmp_path / "test", classes, per_class=4, seed=1)
    js = tmp_path / "r.json"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    p = _run(["train", "--model", "softmax", "--dataset", "folder", "--train-dir", str(train),
              "--test-dir", str(test), "--iters", "200", "--lr", "0.5", "--quiet", "--device", "cpu",
              "--json", str(js)], env=env)
    assert p.returncode == 0, p.stderr
    r = json.loads(js.read_text())
    assert (r["n_train"], r["n_val"], r["n_test"]) == (24, 6, 12)
    assert r["test_acc"] is not None and r["train_acc"] > 60
    assert "train %" in p.stdout  # the final table
    assert os.listdir(tmp_path / "cache" / "linclass")  # decoded arrays cached


def test_image_folder_without_torchvision_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "a" / "x").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision fails
    code = cli.main(["train", "--model", "svm", "--dataset", "folder", "--train-dir",
                     str(tmp_path / "a"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs torchvision" in err[0], err


@needs_torchvision
def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    _image_folder(tmp_path / "a", ["x", "y"], per_class=2)
    _image_folder(tmp_path / "b", ["x", "z"], per_class=2)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    cases = [
        (["train", "--model", "svm", "--dataset", "folder", "--train-dir", str(tmp_path / "missing")],
         "not found"),
        (["train", "--model", "svm", "--dataset", "folder", "--train-dir", str(tmp_path / "a"),
          "--test-dir", str(tmp_path / "b")], "class names differ"),
        (["train", "--model", "perceptron"], "invalid choice"),
        (["train", "--model", "svm", "--load", str(tmp_path / "bad.pt"), "--quiet"], "cannot read"),
        (["train", "--model", "twolayer", "--load", str(tmp_path / "bad.pt"), "--quiet"], "cannot read"),
        (["train", "--model", "svm", "--dataset", "folder"], "--train-dir"),
        (["train", "--model", "svm", "--features", "hog-hue"], "RGB photos"),
        (["train", "--model", "twolayer", "--dataset", "folder", "--train-dir", str(tmp_path / "a"),
          "--features", "hog-hue"], "linear models"),
        (["train", "--model", "svm", "--dataset", "folder", "--train-dir", str(tmp_path / "a"),
          "--standardize", "on"], "standardized already"),
    ]
    for args, message in cases:
        p = _run(args, env=env)
        assert p.returncode == 2, (args, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_cifar10_loader_reads_the_official_format(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 8) for i in range(1, 6)] + [("test_batch", 6)]:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    d = data.preprocess_cifar10(root=str(tmp_path), device="cpu", validation_ratio=0.25,
                                bias_trick=True)
    assert d["X_train"].shape == (30, 3073) and d["X_val"].shape == (10, 3073)
    assert d["X_test"].shape == (6, 3073) and (d["X_train"][:, -1] == 1).all()
    assert d["classes"][0] == "airplane"
    # the mean of the training split (per channel) is what was subtracted
    xtr = d["X_train"][:, :-1].reshape(30, 3, 32, 32)
    assert xtr.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    with open(folder / "test_batch", "wb") as f:
        f.write(b"corrupt")
    with pytest.raises(data.DataError, match="cannot read CIFAR-10 batch"):
        data.preprocess_cifar10(root=str(tmp_path), device="cpu")


def test_digits_preprocessing():
    d = data.load_digits(device="cpu")
    assert d["X_train"].shape[1] == 64 and d["X_train"].dtype == torch.float32
    assert d["X_train"].mean(0).abs().max() < 0.5
    assert d["X_train"].mean().abs() < 1e-6  # one channel: its mean is subtracted
    assert d["image_shape"] == (1, 8, 8)


def test_demo_command_runs_all_three_models():
    p = _run(["demo", "--quiet"])
    assert p.returncode == 0, p.stderr
    for model in ("svm", "softmax", "twolayer"):
        assert model in p.stdout


def test_plots_write_pngs(tmp_path):
    from linclass.workflow import plots

    stat = {"train_acc_history": [0.1, 0.5], "val_acc_history": [0.1, 0.4], "loss_history": [2, 1]}
    paths = [
        plots.loss_history([3, 2, 1], tmp_path / "l.png"),
        plots.accuracy_curves(stat, tmp_path / "a.png"),
        plots.accuracy_curves_of_runs({"h=16": stat, "h=32": stat}, tmp_path / "r.png"),
        plots.linear_weights(torch.randn(3073, 10), list("abcdefghij"), (3, 32, 32), tmp_path / "w.png"),
        plots.net_weights(torch.randn(3072, 20), (3, 32, 32), tmp_path / "n.png"),
        plots.sweep_scatter({(1e-3, 1e-4): (50, 40), (1e-2, 1e-3): (60, 45)}, tmp_path / "s.png"),
        plots.image_grid(torch.rand(5, 3, 8, 8), [0, 1, 2, 0, 1], ["a", "b", "c"], tmp_path / "g.png"),
    ]
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("bias_trick,flatten", [(False, True), (True, True), (False, False)])
def test_mirror_augment_appends_flipped_training_images(bias_trick, flatten):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (20, 3, 4, 5), generator=g).to(torch.uint8).numpy()
    y = torch.arange(20) % 3
    d = data.preprocess(x, y.numpy(), validation_ratio=0.25, bias_trick=bias_trick, flatten=flatten)
    a = data.mirror_augment(d)
    n = len(d["y_train"])
    assert torch.equal(a["X_train"][:n], d["X_train"]) and torch.equal(a["y_train"], d["y_train"].repeat(2))
    assert a["X_val"] is d["X_val"] and a["X_test"] is d["X_test"]
    rows = a["X_train"][n:].reshape(n, -1)
    orig = d["X_train"].reshape(n, -1)
    # pixel (c, h, w) of a mirrored image is pixel (c, h, W - 1 - w) of its original
    img, mir = orig[:, :60].reshape(n, 3, 4, 5), rows[:, :60].reshape(n, 3, 4, 5)
    for w in range(5):
        assert torch.equal(mir[..., w], img[..., 4 - w])
    if bias_trick:
        assert torch.equal(rows[:, -1], torch.ones(n))
    with pytest.raises(ValueError, match="image_shape"):
        data.mirror_augment(dict(d, image_shape=(60,)))


@pytest.mark.parametrize("bias_trick,flatten", [(False, True), (True, True), (False, False)])
def test_standardize_divides_pixels_by_training_std(bias_trick, flatten):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 4, 5), generator=g).to(torch.uint8).numpy()
    x[:, 1, 2, 3] = 7  # a constant pixel: left as it is (no division by zero)
    d = data.preprocess(x, (torch.arange(40) % 3).numpy(), x[:6], (torch.arange(6) % 3).numpy(),
                        validation_ratio=0.25, bias_trick=bias_trick, flatten=flatten)
    s = data.standardize(d)
    pix = lambda X: X.reshape(len(X), -1)[:, :60].double()
    std = pix(d["X_train"]).std(0)
    const = 1 * 20 + 2 * 5 + 3
    assert torch.allclose(pix(s["X_train"]).std(0)[std > 0], torch.ones(59, dtype=torch.float64), atol=1e-5)
    assert torch.equal(pix(s["X_train"])[:, const], pix(d["X_train"])[:, const])
    scale = torch.where(std > 0, std, torch.ones_like(std))
    for name in ("X_val", "X_test"):  # the training split's statistics, not their own
        assert s[name].shape == d[name].shape
        assert torch.allclose(pix(s[name]), pix(d[name]) / scale, atol=1e-5)
    if bias_trick:
        assert torch.equal(s["X_train"][:, -1], torch.ones(len(s["X_train"])))
    with pytest.raises(ValueError, match="image_shape"):
        data.standardize(dict(d, image_shape=(7,)))


@needs_torchvision
def test_photos_train_on_mirror_images_by_default(tmp_path):  # crop-flip for the two-layer net
    train = _image_folder(tmp_path / "train", ["cat", "dog"], per_class=10)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    runs = [("twolayer", ["--hidden", "8"], [], "crop-flip"), ("twolayer", ["--hidden", "8"], ["--augment", "none"], "none"),
            ("softmax", [], [], "flip"), ("svm", ["--search"], [], "flip")]
    for model, opts, extra, augment in runs:
        js = tmp_path / f"{model}-{augment}.json"
        p = _run(["train", "--model", model, "--dataset", "folder", "--train-dir", str(train),
                  "--iters", "20", "--quiet", "--device", "cpu", "--json", str(js), *opts, *extra],
                 env=env)
        assert p.returncode == 0, p.stderr
        r = json.loads(js.read_text())
        # originals only; a search refits on training + validation (16 + 4 images)
        assert r["hyperparameters"]["augment"] == augment and r["n_train"] == (20 if "--search" in opts else 16)
        # the linear models see image features on photos (standardized features, not pixels)
        assert r["hyperparameters"]["features"] == ("pixels" if model == "twolayer" else "hog-hue")
        assert r["hyperparameters"]["standardize"] == "off"
    js = tmp_path / "svm-pixels.json"
    p = _run(["train", "--model", "svm", "--dataset", "folder", "--train-dir", str(train), "--iters", "20",
              "--quiet", "--device", "cpu", "--features", "pixels", "--json", str(js)], env=env)
    assert p.returncode == 0, p.stderr
    hp = json.loads(js.read_text())["hyperparameters"]
    assert (hp["features"], hp["standardize"], hp["augment"]) == ("pixels", "on", "flip")
    js = tmp_path / "svm.json"
    assert cli.main(["train", "--model", "svm", "--iters", "20", "--quiet", "--device", "cpu",
                     "--json", str(js)]) == 0
    hp = json.loads(js.read_text())["hyperparameters"]
    assert hp["augment"] == "none" and hp["standardize"] == "off" and hp["features"] == "pixels"  # digits
    assert cli.main(["train", "--model", "softmax", "--iters", "20", "--quiet", "--device", "cpu",
                     "--standardize", "on", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["hyperparameters"]["standardize"] == "on"


def test_search_refits_on_train_plus_val_unless_told_not_to(tmp_path):
    runs = {}
    for flag in ([], ["--no-refit"]):
        js = tmp_path / f"r{len(flag)}.json"
        assert cli.main(["train", "--model", "softmax", "--search", "--iters", "100", "--quiet",
                         "--device", "cpu", "--json", str(js), *flag]) == 0
        runs[bool(flag)] = json.loads(js.read_text())
    refit, kept = runs[False], runs[True]
    assert refit["refit"] and not kept["refit"]
    assert refit["n_train"] == kept["n_train"] + kept["n_val"]
    # the same search: the same choice and the same validation accuracy reported
    assert refit["hyperparameters"] == kept["hyperparameters"]
    assert refit["val_acc"] == refit["search_val_acc"] == kept["search_val_acc"]
    assert kept["val_acc"] == pytest.approx(kept["search_val_acc"])  # the kept model, measured again
    assert refit["test_acc"] != kept["test_acc"] or refit["train_acc"] != kept["train_acc"]


def test_two_layer_options_and_augment_rules(tmp_path):
    js = tmp_path / "r.json"
    assert cli.main(["train", "--model", "twolayer", "--iters", "30", "--quiet", "--device", "cpu",
                     "--momentum", "0.5", "--init-std", "0.01", "--augment", "crop-flip",
                     "--json", str(js)]) == 0
    hp = json.loads(js.read_text())["hyperparameters"]
    assert (hp["momentum"], hp["init_std"], hp["augment"]) == (0.5, 0.01, "crop-flip")
    assert cli.main(["train", "--model", "twolayer", "--iters", "30", "--quiet", "--device", "cpu",
                     "--json", str(js)]) == 0
    assert json.loads(js.read_text())["hyperparameters"]["augment"] == "shift"  # digits default
    for args, message in [(["--model", "svm", "--augment", "shift"], "two-layer net"),
                          (["--model", "twolayer", "--momentum", "1.0"], "--momentum")]:
        p = _run(["train", *args, "--iters", "5", "--quiet", "--device", "cpu"])
        assert p.returncode == 2 and message in p.stderr, p.stderr


def test_split_image_folder_is_stratified_seeded_and_links(tmp_path):
    src = _image_folder(tmp_path / "src", ["a", "b", "c"], per_class=7)
    (tmp_path / "src" / "a" / "extra.png").write_bytes((src / "a" / "0.png").read_bytes())  # 8, 7, 7
    train_dir, test_dir = data.split_image_folder(str(src), str(tmp_path / "s"), test_count=5, seed=3)
    counts = {c: len(os.listdir(os.path.join(test_dir, c))) for c in "abc"}
    assert sum(counts.values()) == 5 and counts["a"] == 2  # 5 * 8 / 22 = 1.8 -> 2
    for c in "abc":
        test_names = set(os.listdir(os.path.join(test_dir, c)))
        train_names = set(os.listdir(os.path.join(train_dir, c)))
        assert not test_names & train_names and test_names | train_names == set(os.listdir(src / c))
        for name in test_names:
            link = os.path.join(test_dir, c, name)
            assert os.path.islink(link) and os.path.samefile(link, src / c / name)
    # the same seed again: accepted (the same split); another seed into the same folder: refused
    assert data.split_image_folder(str(src), str(tmp_path / "s"), test_count=5, seed=3) == (train_dir, test_dir)
    other = data.split_image_folder(str(src), str(tmp_path / "t"), test_count=5, seed=4)
    if any(set(os.listdir(os.path.join(other[1], c))) != set(os.listdir(os.path.join(test_dir, c))) for c in "abc"):
        with pytest.raises(data.DataError, match="another split"):
            data.split_image_folder(str(src), str(tmp_path / "s"), test_count=5, seed=4)
    with pytest.raises(ValueError, match="test_count"):
        data.split_image_folder(str(src), str(tmp_path / "u"), test_count=22)
    with pytest.raises(data.DataError, match="not found"):
        data.split_image_folder(str(tmp_path / "none"), str(tmp_path / "u"))
    # the CLI command
    p = _run(["split", str(src), str(tmp_path / "v"), "--test", "4"])
    assert p.returncode == 0, p.stderr
    assert sum(len(os.listdir(tmp_path / "v" / "test" / c)) for c in "abc") == 4


@pytest.mark.parametrize("bias", [False, True])
def test_random_crop_flip_equals_a_pixel_loop(bias):
    shape, pad = (2, 5, 6), 2
    n, pixels = 7, 60
    X = torch.randn(n, pixels + (1 if bias else 0), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    out = data.random_crop_flip(shape, pad=pad, generator=g)(X)
    assert out.shape == X.shape and out.dtype == X.dtype
    if bias:
        assert torch.equal(out[:, -1], X[:, -1])
    images, got = X[:, :pixels].reshape(n, *shape), out[:, :pixels].reshape(n, *shape)
    seen = set()
    for i in range(n):  # some shift and mirror must give each output image exactly
        matches = []
        for dy in range(-pad, pad + 1):
            for dx in range(-pad, pad + 1):
                for mirror in (False, True):
                    src = images[i].flip(-1) if mirror else images[i]
                    ref = torch.zeros(shape, dtype=torch.float64)
                    for r in range(shape[1]):
                        for c in range(shape[2]):
                            if 0 <= r + dy < shape[1] and 0 <= c + dx < shape[2]:
                                ref[:, r, c] = src[:, r + dy, c + dx]
                    if torch.equal(ref, got[i]):
                        matches.append((dy, dx, mirror))
        assert matches, i
        seen.update(matches)
    assert len(seen) > 3  # the draws differ between rows
    same = data.random_crop_flip(shape, pad=0, flip=False)(X)
    assert torch.equal(same, X)
    with pytest.raises(ValueError, match="image_shape"):
        data.random_crop_flip((5, 6))
    with pytest.raises(ValueError, match="needs 60"):
        data.random_crop_flip(shape)(X[:, :10])


def test_preprocess_without_validation_split():
    d = data.load_digits(device="cpu", validation_ratio=0.0)
    assert d["X_val"].shape == (0, 64) and len(d["y_train"]) == 1797 - 359
    both = data.train_plus_val(data.load_digits(device="cpu"))
    assert both["X_val"] is None and len(both["y_train"]) == 1797 - 359
