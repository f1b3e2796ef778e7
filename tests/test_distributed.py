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
