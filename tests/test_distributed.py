"""Several processes with torchrun (gloo, 2 processes, CPU): training steps in lockstep and equal to one
process averaging the ranks' gradients by hand; a non-finite loss on one rank; evaluation and prediction
equal to one process; a killed rank and --resume; ranks that disagree refused."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from models.flow import grid_coordinates
from models.losses import flow_loss, normal_boundary, occ_loss
from models.positions import flatten_positions
from tests.conftest import CLASS, OTHER
from tests.distributed_worker import STEPS, model_and_trainer, step_data
from utils.run.training import FLOW_MINIBATCH, level_masks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# torchrun gives each of several processes one thread; one process with one thread sums in the same order
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
pytestmark = pytest.mark.slow


def torchrun(*args, nproc=2, timeout=420, cwd=REPO):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))


def _assert_ran(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _equal(a, b):
    """Bitwise equal nested states (NaN equal to NaN)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _equal(x, y)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    else:
        assert a == b or (a != a and b != b)


def _averaged_step(optimizer, losses):
    """One optimizer step on the mean of the ranks' gradients, computed here one rank at a time."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = []
    for loss in losses:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads.append([None if p.grad is None else p.grad.clone() for p in params])
    optimizer.zero_grad(set_to_none=True)
    for i, p in enumerate(params):
        found = [g[i] for g in grads]
        if any(g is not None for g in found):
            p.grad = sum(torch.zeros_like(p) if g is None else g for g in found) / len(found)
    optimizer.step()


def _set_buffers(module, values):
    """New buffer tensors (the graphs of earlier forwards keep theirs)."""
    for name, sub in module.named_modules():
        for key in list(sub._buffers):
            sub._buffers[key] = values[f"{name}.{key}" if name else key].clone()


def _reference_training():
    """The worker's three steps on both ranks' batches in one process, each gradient averaged by hand."""
    model, trainer = model_and_trainer()
    generators = [torch.Generator().manual_seed(7 + rank) for rank in (0, 1)]
    for step in range(STEPS):
        data = [step_data(rank, step) for rank in (0, 1)]
        masks = [level_masks(m, f) for f, _, m in data]
        _averaged_step(trainer.optimizers["vq"], [model.vq.loss(r, lm) for (_, r, _), lm in zip(data, masks)])
        before = {k: v.clone() for k, v in model.constraintor.named_buffers()}
        constrained, after = [], []
        for _, residuals, _ in data:   # each rank's forward from the same parameters and running statistics
            _set_buffers(model.constraintor, before)
            constrained.append(model.constraintor(residuals))
            after.append({k: v.clone() for k, v in model.constraintor.named_buffers()})
        _averaged_step(trainer.optimizers["constraintor"], [
            sum(occ_loss(flatten_positions(e), flatten_positions(r), lm.reshape(-1)) for e, r, lm in zip(es, rs, lms))
            for es, (_, rs, _), lms in zip(constrained, data, masks)])
        _set_buffers(model.constraintor, {k: (after[0][k] + after[1][k]) / 2 if v.is_floating_point() else after[0][k]
                                          for k, v in before.items()})   # averaged after the step
        for level in range(len(constrained[0])):
            inputs = []
            for rank in (0, 1):
                e = constrained[rank][level].detach()
                b, _, h, w = e.shape
                order = torch.randperm(b * h * w, generator=generators[rank])
                assert len(order) <= FLOW_MINIBATCH   # one mini-batch per level
                inputs.append((flatten_positions(e)[order], grid_coordinates(h, w).repeat(b, 1)[order],
                               masks[rank][level].reshape(-1)[order]))
            outputs = [model.flow_log_likelihoods(level, rows, coords) for rows, coords, _ in inputs]
            estimates = [normal_boundary(lp, m, trainer.config.pos_beta) for (lp, _), (_, _, m) in zip(outputs, inputs)]
            trainer.boundaries.update(level, torch.tensor(float(sum(e.double() for e in estimates) / 2)))
            b_n = trainer.boundaries.get(level)
            _averaged_step(trainer.optimizers["flow"], [
                flow_loss(lp, lpa, m, (b_n, b_n - trainer.config.margin_tau), trainer.config.bgspp_lambda)
                for (lp, lpa), (_, _, m) in zip(outputs, inputs)])
    return model, trainer


def test_two_ranks_step_together_and_equal_one_process_averaging_their_gradients(tmp_path):
    _assert_ran(torchrun("tests/distributed_worker.py", "steps", str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    _equal(ranks[0]["model"], ranks[1]["model"])
    _equal(ranks[0]["trainer"]["optimizers"], ranks[1]["trainer"]["optimizers"])
    assert ranks[0]["losses"] != ranks[1]["losses"]   # different batches, one model
    model, trainer = _reference_training()
    # A conv bias before BatchNorm has a gradient of zero up to rounding, which Adam turns into steps of +-lr:
    # those are compared between the ranks (above) but not with the reference.
    noise = {f"constraintor.levels.{level}.0.bias" for level in range(2)}
    for name, value in model.state_dict().items():
        if name not in noise:
            torch.testing.assert_close(ranks[0]["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    names = {id(p): n for n, p in model.named_parameters()}
    for name, optimizer in trainer.optimizers.items():
        expected = optimizer.state_dict()["state"]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, state in ranks[0]["trainer"]["optimizers"][name]["state"].items():
            if names[id(params[index])] not in noise:
                for key in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(state[key], expected[index][key], rtol=1e-4, atol=1e-9)
    assert ranks[0]["trainer"]["boundaries"]["values"] == pytest.approx(trainer.boundaries.state_dict()["values"],
                                                                         rel=1e-5)


def test_a_non_finite_loss_on_one_rank_makes_both_skip(tmp_path):
    _assert_ran(torchrun("tests/distributed_worker.py", "nonfinite", str(tmp_path), timeout=180))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(np.isfinite(v) for v in ranks[0]["losses"][0].values() if v is not None)   # rank 0 alone was fine
    assert ranks[0]["skipped"] == ranks[1]["skipped"] > 0
    # rank 1's NaN is on level 0: the VQ and OCC losses (summed over levels) and the level-0 flow steps are
    # skipped on both ranks; the level-1 flow steps are taken, on both
    for name, value in ranks[0]["model"].items():
        if "running" in name:   # the running statistics saw the NaN batch
            continue
        _equal(value, ranks[1]["model"][name])
        if name.startswith(("vq.", "constraintor.", "flows.0.")) and "num_batches" not in name:
            _equal(value, ranks[0]["initial"][name])
    assert not torch.equal(ranks[0]["model"]["flows.1.inn.module_list.0.subnet.fc2.weight"],
                           ranks[0]["initial"]["flows.1.inn.module_list.0.subnet.fc2.weight"])


def test_a_real_training_epoch_keeps_every_rank_the_same(trained, tmp_path):
    """One epoch of the training run on demo images (its reference pool, sampler, stage-1 batches)."""
    _assert_ran(torchrun("tests/distributed_worker.py", "epoch", str(tmp_path), trained.root, trained.refs))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    _equal(ranks[0], ranks[1])


def _uneven_copy(trained, folder, keep):
    """The demo data with only the first ``keep[c]`` test images of each class c, so that a class larger than a
    rank's share of all images is cut into slices (``shard_plan``)."""
    root = shutil.copytree(trained.root, folder)
    for class_name, count in keep.items():
        test = os.path.join(root, class_name, "test")
        images = sorted(os.path.join(d, f) for d, _, files in os.walk(test) for f in files)
        for path in images[count:]:
            os.remove(path)
    return root


def _evaluate(trained, data, out, nproc):
    args = ["main.py", "--eval_only", "--checkpoint", trained.ckpt, "--setting", "custom", "--source_dataset", "demo",
            "--target_dataset", "demo", "--seen_classes", "stripes", "checker", "--unseen_classes", CLASS, OTHER,
            "--test_dataset_dir", data,
            "--test_ref_feature_dir", trained.refs, "--shots", "2", "4", "--ref_groups", "2", "--eval_batch_size", "2",
            "--device", "cpu", "--num_workers", "0", "--checkpoint_path", str(out), "--preset", "recommended"]
    if nproc == 1:
        proc = subprocess.run([sys.executable, "main_extended_multi_shot.py", *args[1:]], cwd=REPO,
                              capture_output=True, text=True, timeout=420, env=ONE_THREAD)
    else:
        proc = torchrun("main_extended_multi_shot.py", *args[1:], nproc=nproc)
    _assert_ran(proc)
    return proc


@pytest.mark.parametrize("keep", [{CLASS: 5, OTHER: 2}, {CLASS: 2, OTHER: 4}],
                         ids=["slices in rank order", "slices out of rank order"])
def test_a_two_rank_evaluation_writes_the_tables_of_one_process(trained, tmp_path, keep):
    """{chip: 5, weave: 2}: chip's slices go to ranks 0 and 1 and meet on rank 0; {chip: 2, weave: 4}: weave's
    first slice is on rank 1 and its second on rank 0, so they must be put together by slice, not by rank."""
    data = _uneven_copy(trained, tmp_path / "data", keep)
    _evaluate(trained, data, tmp_path / "one", 1)
    _evaluate(trained, data, tmp_path / "two", 2)
    found = 0
    for folder, _, files in os.walk(tmp_path / "one"):
        for name in files:
            if name.endswith("_metrics.csv") or name.endswith("_maps.csv"):
                twin = os.path.join(str(tmp_path / "two"), os.path.relpath(os.path.join(folder, name), tmp_path / "one"))
                assert open(os.path.join(folder, name)).read() == open(twin).read(), name
                found += 1
            if name.endswith("_scores.csv"):
                one = pd.read_csv(os.path.join(folder, name))
                two = pd.read_csv(os.path.join(str(tmp_path / "two"), os.path.relpath(folder, tmp_path / "one"), name))
                assert one["Image"].tolist() == two["Image"].tolist()
                assert np.allclose(one.select_dtypes("number"), two.select_dtypes("number"), rtol=1e-6, atol=0)
    assert found == 4   # k = 2 and 4: metrics and maps


@pytest.mark.parametrize("normalization", ["references", "set"])
def test_a_two_rank_prediction_writes_the_scores_of_one_process(trained, tmp_path, normalization):
    common = ["--checkpoint", trained.ckpt, "--ref_features", os.path.join(trained.refs, CLASS), "--images",
              trained.images, "--batch_size", "2", "--device", "cpu", "--num_workers", "0", "--normalization",
              normalization, "--save_maps"]
    one = subprocess.run([sys.executable, "predict.py", *common, "--out", str(tmp_path / "one")], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    _assert_ran(one)
    _assert_ran(torchrun("predict.py", *common, "--out", str(tmp_path / "two")))
    a, b = (pd.read_csv(tmp_path / name / "scores.csv") for name in ("one", "two"))
    assert a["image"].tolist() == b["image"].tolist() and (a["label"] == b["label"]).all()
    assert np.allclose(a["score"], b["score"], rtol=1e-6, atol=0) and np.allclose(a["threshold"], b["threshold"])
    assert sorted(os.listdir(tmp_path / "one" / "heatmaps")) == sorted(os.listdir(tmp_path / "two" / "heatmaps"))
    assert not [n for n in os.listdir(tmp_path / "two") if n.startswith(".")]


def _training(trained, out, *extra):
    return ["main.py", "--setting", "custom", "--source_dataset", "demo", "--target_dataset", "demo",
            "--seen_classes", "stripes", "nut", "--unseen_classes", CLASS, "--train_dataset_dir", trained.root,
            "--test_dataset_dir", trained.root, "--test_ref_feature_dir", trained.refs, "--num_ref_shot", "4",
            "--train_ref_shot", "2", "--train_ref_pool", "3", "--backbone", "tf_efficientnet_lite0", "--epochs", "4",
            "--stage1_epochs", "2", "--batch_size", "2", "--eval_batch_size", "4", "--eval_freq", "4", "--lr", "1e-4",
            "--num_workers", "0", "--coupling_layers", "2", "--num_embeddings", "16", "--num_heatmaps", "0",
            "--device", "cpu", "--checkpoint_path", str(out), "--no_map_metrics", *extra]


def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def _rank_pid(launcher, rank):
    for child in _children(launcher):
        try:
            with open(f"/proc/{child}/environ", "rb") as f:
                if f"RANK={rank}".encode() in f.read().split(b"\0"):
                    return child
        except OSError:
            pass
    return None


def test_a_killed_rank_ends_the_job_and_resume_finishes_it_as_if_uninterrupted(trained, tmp_path):
    _assert_ran(torchrun(*_training(trained, tmp_path / "whole")))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *_training(trained, tmp_path / "cut")]
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = tmp_path / "cut" / "custom" / "custom_latest.pth"
    deadline = time.time() + 300
    while not latest.exists() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    victim = _rank_pid(launcher.pid, 1)
    assert victim is not None and launcher.poll() is None, "the run ended before a rank could be killed"
    os.kill(victim, signal.SIGKILL)
    started = time.time()
    out, err = launcher.communicate(timeout=180)
    assert launcher.returncode != 0 and time.time() - started < 120
    assert re.search(r"rank:? 1\b", err), err[-2000:]
    assert not [p for p in os.listdir(latest.parent) if p.endswith(".tmp")]
    _assert_ran(torchrun(*_training(trained, tmp_path / "cut", "--resume")))
    one, two = (open(tmp_path / name / "custom" / "custom_epoch4_metrics.csv").read() for name in ("whole", "cut"))
    assert one == two


def test_ranks_started_with_different_arguments_are_refused(trained, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                   LOCAL_RANK=str(rank), PYTHONWARNINGS="ignore")
        args = ["main.py", "--baseline", "knn", "--setting", "custom", "--source_dataset", "demo",
                "--target_dataset", "demo", "--seen_classes", "stripes", "--unseen_classes", CLASS, "--test_dataset_dir", trained.root,
                "--test_ref_feature_dir", trained.refs, "--backbone", "tf_efficientnet_lite0", "--device", "cpu",
                "--num_workers", "0", "--checkpoint_path", str(tmp_path), "--seed", str(rank)]
        procs.append(subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 2, err[-2000:]
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "differ in arguments" in errors[0] and "Traceback" not in err
