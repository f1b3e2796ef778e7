"""Files a run reads and writes, beyond the metrics: safe checkpoints and weights files,
checksummed reference features, the training history (fast: no training here).

The whole-run checks (a real checkpoint loaded weights-only, the run record and the
history of a 2-epoch run, kill-and-resume) are in test_engine.py and test_cli_errors.py.
"""
import argparse
import hashlib
import json
import math
import pickle
import random
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from utils import atomic, safe_load
from utils.formats import checkpoint, reference_features
from utils.formats.checkpoint import CHECKPOINT_FORMAT
from utils.errors import UserError
from utils.formats.run_outputs import CSV_COLUMNS, RunOutputs
from utils.report.history import TrainingHistory, check_tensorboard, spans_decades
from utils.metrics import METRIC_NAMES
from utils.seed import rng_state, seed_everything, set_rng_state


class Payload:
    """Pickled as the call ``open(marker, "w")``: unpickling it unsafely creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


# --------------------------------------------------------------------------- checkpoints and weights

def test_crafted_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    # The payload is real: an unsafe load of a twin file runs it.
    twin_marker = tmp_path / "twin_payload_ran"
    torch.save({"x": Payload(twin_marker)}, tmp_path / "twin.pth")
    torch.load(tmp_path / "twin.pth", weights_only=False)
    assert twin_marker.exists()

    marker = tmp_path / "payload_ran"
    zipped = tmp_path / "crafted.pth"  # torch.save's zip format, shaped like a checkpoint of ours
    torch.save({"format": CHECKPOINT_FORMAT, "model": {"w": torch.ones(2)}, "rng": Payload(marker)}, zipped)
    legacy = tmp_path / "crafted.pkl"  # a bare pickle
    with open(legacy, "wb") as f:
        pickle.dump({"state_dict": Payload(marker)}, f)
    for path in (zipped, legacy):
        for load, flag in ((checkpoint.load, "--resume"), (safe_load.load_weights, "--backbone_weights")):
            with pytest.raises(UserError) as err:
                load(str(path))
            message = str(err.value)
            assert message.startswith(f"{flag} {path}: refused") and "open" in message and "\n" not in message
    assert not marker.exists()


def test_checkpoints_hold_only_plain_values_and_round_trip_weights_only(tmp_path):
    seed_everything(3)
    random.random(), np.random.randn(), torch.rand(1)  # noqa: B018 - advance every generator
    state = {"format": CHECKPOINT_FORMAT, "rng": rng_state(), "args": {"lr": 1e-4, "resume": None}}
    path = tmp_path / "ckpt.pth"
    checkpoint.save(str(path), state)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    expected = (random.random(), np.random.randn(), np.random.rand(), torch.rand(1))
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert (random.random(), np.random.randn(), np.random.rand(), torch.rand(1)) == expected

    # a state that weights-only loading would refuse is never written
    with pytest.raises(TypeError, match="argparse.Namespace"):
        checkpoint.save(str(tmp_path / "bad.pth"), {"args": argparse.Namespace(lr=1)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]


def test_checkpoints_of_the_earlier_format_are_converted_on_load(tmp_path):
    # Earlier checkpoints stored the random states as the libraries return them (NumPy: a uint32 array).
    seed_everything(7)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    old = {"format": CHECKPOINT_FORMAT, "model": {"w": torch.ones(2)},
           "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    path = tmp_path / "old.pth"
    torch.save(old, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path))  # not loadable weights-only as is
    expected = (random.random(), np.random.randn(), np.random.rand(3).tolist())
    state = checkpoint.load(str(path))
    assert isinstance(state["rng"]["numpy"]["state"]["key"], list)
    set_rng_state(state["rng"])
    assert (random.random(), np.random.randn(), np.random.rand(3).tolist()) == expected
    checkpoint.save(str(tmp_path / "new.pth"), state)  # and it is written back in the plain format
    torch.load(tmp_path / "new.pth", weights_only=True)


def test_load_weights_unwraps_state_dicts(tmp_path):
    from safetensors.torch import save_file

    weights = {"conv.weight": torch.randn(3, 2), "bn.bias": torch.randn(3)}
    files = {"plain.pth": weights, "wrapped.pth": {"state_dict": {f"module.{k}": v for k, v in weights.items()},
                                                   "epoch": 3}}
    for name, content in files.items():
        torch.save(content, tmp_path / name)
    save_file(weights, str(tmp_path / "w.safetensors"))
    for name in list(files) + ["w.safetensors"]:
        loaded = safe_load.load_weights(str(tmp_path / name))
        assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)
    torch.save({"epoch": 3}, tmp_path / "nothing.pth")
    with pytest.raises(UserError, match="holds no state_dict"):
        safe_load.load_weights(str(tmp_path / "nothing.pth"))


# --------------------------------------------------------------------------- reference features

def test_changed_or_truncated_reference_layer_is_refused(tmp_path):
    torch.manual_seed(0)
    sizes, channels = [8, 4, 2], [4, 6, 8]
    features = [torch.rand(3, c, s, s) for c, s in zip(channels, sizes)]
    extractor = {"backbone": "tiny", "channels": channels, "feature_sizes": [[s, s] for s in sizes],
                 "image_size": 32}
    folder = tmp_path / "refs"
    reference_features.save(str(folder), "cls", features, {"backbone": "tiny"})
    meta = json.loads((folder / "cls" / "meta.json").read_text())
    for level in (1, 2, 3):
        data = (folder / "cls" / f"layer{level}.npy").read_bytes()
        assert meta["sha256"][f"layer{level}.npy"] == hashlib.sha256(data).hexdigest()
    bank = reference_features.load_bank(str(folder), "cls", extractor, 3)
    layer2 = folder / "cls" / "layer2.npy"
    original = layer2.read_bytes()

    changed = bytearray(original)
    changed[-1] ^= 0x40  # one value changes; the file is still a valid array of the right shape
    layer2.write_bytes(bytes(changed))
    assert np.load(layer2).shape == tuple(bank.levels[1].shape)
    truncated = original[: len(original) - 4 * channels[1]]  # one row short: np.load cannot tell
    for content in (bytes(changed), truncated):
        layer2.write_bytes(content)
        with pytest.raises(UserError) as err:
            reference_features.load_bank(str(folder), "cls", extractor, 2)
        assert str(layer2) in str(err.value) and "extract_ref_features.py" in str(err.value)

    # the authors' files (no meta.json) load unchecked
    layer2.write_bytes(original)
    (folder / "cls" / "meta.json").unlink()
    unchecked = reference_features.load_bank(str(folder), "cls", extractor, 3)
    assert all(torch.equal(a, b) for a, b in zip(unchecked.levels, bank.levels))


# --------------------------------------------------------------------------- training history

def _results(values: dict) -> pd.DataFrame:
    rows = [dict({"Class Name": c}, **values) for c in ("a", "b")] + [dict({"Class Name": "Mean"}, **values)]
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS))


def test_history_rows_on_resume_are_kept_up_to_the_checkpoint(tmp_path):
    out = RunOutputs(str(tmp_path), "run")
    history = TrainingHistory(out)
    for epoch in (1, 2, 3):
        history.add_epoch(epoch, 1 if epoch == 1 else 2, {"vq": 10.0 ** epoch, "occ": 1.0 * epoch, "flow": -epoch},
                          lr=1e-4, seconds=2.5, skipped_steps=epoch - 1)
    history.add_evaluation(1, _results({m: 0.5 for m in METRIC_NAMES}), seconds=1.0)
    # epoch 2's evaluation reached its metrics CSV, then the run was killed (its checkpoint: epoch 2)
    _results({m: 0.75 for m in METRIC_NAMES}).to_csv(out.path("_epoch2_metrics.csv"), index=False)

    resumed = TrainingHistory(out, resume_epoch=2)
    resumed.add_epoch(3, 2, {"vq": 1000.0, "occ": 3.0, "flow": -3.0}, lr=1e-5, seconds=2.0, skipped_steps=0)
    frame = pd.read_csv(out.path("_history.csv"))
    assert frame["epoch"].tolist() == [1, 2, 3] and frame["stage"].tolist() == [1, 2, 2]
    assert frame["vq_loss"].tolist() == [10.0, 100.0, 1000.0] and frame["lr"].tolist() == [1e-4, 1e-4, 1e-5]
    assert frame["skipped_steps"].tolist() == [0, 1, 0]
    assert frame["Image AUC"].tolist()[:2] == [0.5, 0.75] and math.isnan(frame["Image AUC"][2])
    assert (tmp_path / "run_history.png").stat().st_size > 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_log_scale_only_for_positive_values_spanning_decades():
    assert spans_decades(np.array([2.0, 20.0, np.nan]))
    assert not spans_decades(np.array([2.0, 19.0]))
    assert not spans_decades(np.array([-1.0, 100.0]))
    assert not spans_decades(np.array([5.0]))


def test_tensorboard_missing_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"^--tensorboard .*pip install tensorboard"):
        check_tensorboard(str(tmp_path / "tb"))
    check_tensorboard(None)  # not asked for: nothing to check


def test_tensorboard_gets_the_same_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = RunOutputs(str(tmp_path / "run"), "run")
    history = TrainingHistory(out, str(tmp_path / "tb"))
    for epoch in (1, 2):
        history.add_epoch(epoch, 1, {"vq": 1.0 / epoch, "occ": 2.0, "flow": 3.0}, lr=1e-4, seconds=1.0,
                          skipped_steps=0)
    history.add_evaluation(2, _results({m: 0.9 for m in METRIC_NAMES}), seconds=1.0)
    history.close()
    events = EventAccumulator(str(tmp_path / "tb" / "run"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss/vq")] == [(1, 1.0), (2, 0.5)]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("eval/Image AUC")] == [(2, 0.9)]


def test_result_files_get_the_mode_of_a_plain_open(tmp_path):
    """Files are written under a private temporary name (mkstemp: 0600) and renamed; the result
    must be readable like any file the user's umask allows, not private."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        atomic.save_json(str(tmp_path / "a.json"), {"x": 1})
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
        os.umask(0o077)
        atomic.save_json(str(tmp_path / "b.json"), {"x": 1})
    finally:
        os.umask(old)
    mode = lambda name: stat.S_IMODE(os.stat(tmp_path / name).st_mode)  # noqa: E731
    assert mode("a.json") == mode("plain.txt") == 0o644
    assert mode("b.json") == 0o600


def test_image_labels_only_say_so_and_chart_the_image_metric(tmp_path, monkeypatch):
    """A class labelled per image has no pixel metrics: the summary says so (no "nan"), and the per-class
    chart draws the image AUROC instead of empty pixel-AUROC bars."""
    from types import SimpleNamespace

    from utils.report import plots, results

    labels_only = dict({m: float("nan") for m in METRIC_NAMES}, **{"Image AUC": 0.75, "Image AP": 0.8, "Image F1": 0.7})
    per_class = {"a": SimpleNamespace(metrics=labels_only, group_metrics=[], maps={}, heatmaps=[], scores={},
                                      paths=[], labels=None)}
    drawn = []
    monkeypatch.setattr(plots, "plot_class_metric", lambda table, metric, path, title=None: drawn.append((metric, title)))
    table = results.write_evaluation(RunOutputs(str(tmp_path), "run"), 1, per_class, heatmaps=False)
    line = results.summary_line("run", table)
    assert line == "run: image AUROC 0.7500 | image labels only (mean over 1 classes)"
    assert drawn == [("Image AUC", "run, epoch 1: image AUROC per class (image labels only)")]
    with_pixels = table.assign(**{"Pixel AUC": 0.9, "Pixel AUPRO": 0.8})
    assert results.summary_line("run", with_pixels).endswith("pixel AUROC 0.9000 | AUPRO 0.8000 (mean over 1 classes)")
