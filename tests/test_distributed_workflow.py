"""The workflow on several processes (linclass/workflow/parallel.py): `torchrun ... -m
linclass train` against the one-process run, and the data-parallel step against the
one-process step.  gloo on 127.0.0.1; every launch has a timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from test_distributed import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

LAUNCH_TIMEOUT = 300  # seconds for one torchrun (start-up of every rank included)


def _train(args: list, out, nproc: int = 1, threads: int | None = None) -> dict:
    """`linclass train ARGS` in one process or under torchrun with nproc processes, each
    with `threads` threads (default: the 2 cores shared among them)."""
    json_path = os.path.join(out, "result.json")
    launcher = [sys.executable, "-m", "linclass"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "linclass"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or max(1, 2 // nproc)))
    proc = subprocess.run(launcher + ["train", *args, "--quiet", "--json", json_path],
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(json_path) as f:
        return json.load(f)


def test_torchrun_trains_the_two_layer_net_data_parallel(tmp_path):
    args = ["--model", "twolayer", "--dataset", "digits"]
    one = _train(args, str(tmp_path))
    two = _train(args + ["--out", str(tmp_path / "two")], str(tmp_path), nproc=2)
    assert two["processes"] == 2 and one["processes"] == 1
    # Each step is the one-process step (the gradient summed in another order): the
    # accuracies agree to an image or so (360 test images: 0.28 points each).
    assert abs(two["test_acc"] - one["test_acc"]) <= 0.3, (one["test_acc"], two["test_acc"])
    assert abs(two["val_acc"] - one["val_acc"]) <= 0.3
    # Rank 0 alone wrote the outputs.
    assert sorted(os.listdir(tmp_path / "two"))[:2] == ["accuracy.png", "loss.png"]
    assert json.load(open(tmp_path / "two" / "results.json"))["processes"] == 2


def test_torchrun_spreads_the_two_layer_search_over_the_ranks(tmp_path):
    args = ["--model", "twolayer", "--dataset", "digits", "--search", "--iters", "300"]
    one = _train(args, str(tmp_path))  # 2 threads; under torchrun 1 per rank
    two = _train(args, str(tmp_path), nproc=2)
    assert two["hyperparameters"] == one["hyperparameters"]
    assert abs(two["search_val_acc"] - one["search_val_acc"]) <= 0.2
    # The refit runs once, on rank 0 with both ranks' threads (parallel.on_main): the
    # one-process refit, even where torch's products round differently on 1 and 2
    # threads (the refit's X^T dh does on some CPUs).
    assert two["test_acc"] == one["test_acc"]


def test_torchrun_spreads_the_linear_search_over_three_ranks(tmp_path):
    args = ["--model", "softmax", "--dataset", "digits", "--search", "--iters", "400"]
    one = _train(args, str(tmp_path))
    three = _train(args, str(tmp_path), nproc=3)
    assert three["hyperparameters"] == one["hyperparameters"]
    assert len(three["search_results"]) == len(one["search_results"])
    for a, b in zip(one["search_results"], three["search_results"]):
        assert (a["lr"], a["reg"]) == (b["lr"], b["reg"])
        assert abs(a["val_acc"] - b["val_acc"]) <= 0.2
    assert abs(three["test_acc"] - one["test_acc"]) <= 0.2


def _case_on_main(rank, world):
    """parallel.on_main: rank 0 alone runs the function, with every local rank's threads,
    and every rank gets its result; an exception there is raised on every rank."""
    from linclass.workflow import parallel

    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    torch.set_num_threads(1)
    calls = []

    def work():
        calls.append(torch.get_num_threads())
        return {"rank": parallel.rank(), "t": torch.arange(3.0)}

    result = parallel.on_main(work)
    assert result["rank"] == 0 and torch.equal(result["t"], torch.arange(3.0))
    assert calls == ([world] if rank == 0 else [])
    assert torch.get_num_threads() == 1  # given back

    def fail():
        raise ValueError("bad configuration")

    with pytest.raises((ValueError, RuntimeError), match="bad configuration"):
        parallel.on_main(fail)
    assert torch.get_num_threads() == 1
    assert parallel.on_main(lambda: rank) == 0  # the group still works afterwards


def test_on_main_runs_once_and_shares_the_result_or_the_error():
    run_ranks(_case_on_main, 2)


def _case_data_parallel_steps(rank, world):
    """nn_train with data_parallel on `world` ranks = nn_train in one process, step for
    step (float64: up to the order of the gradient sums)."""
    from linclass.workflow import two_layer_net as tln

    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (300,), generator=g)
    results = []
    for data_parallel in (True, False):
        torch.manual_seed(1)
        net = tln.TwoLayerNet(12, 16, 5, dtype=torch.float64, device="cpu", std=0.1)
        stat = net.train(X, y, X[:50], y[:50], learning_rate=0.2, reg=1e-3, num_iters=25,
                         batch_size=37, momentum=0.9, nesterov=True, data_parallel=data_parallel)
        results.append((net.params, stat["loss_history"]))
    (dp, dp_loss), (single, single_loss) = results
    for key in tln.PARAM_KEYS:
        torch.testing.assert_close(dp[key], single[key], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.tensor(dp_loss), torch.tensor(single_loss), rtol=1e-10, atol=0)


@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_step_is_the_one_process_step(world):
    run_ranks(_case_data_parallel_steps, world)
