"""Bad input, faults and resume, through the scripts as a user runs them.

Every bad input must end in ONE line "error: ..." naming the path or flag,
exit status 2, no traceback and no file written.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from datasets import DEMO_SEEN, DEMO_UNSEEN, generate_demo_dataset
from models.extractor import OFFLINE_BACKBONE, build_extractor
from tests.run_helpers import run_script
from utils.metrics import METRIC_NAMES
from utils.run.extraction import extract_reference_features

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Payload:
    """Pickled as ``open(marker, "w")``: unpickling it unsafely would create the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    root = generate_demo_dataset(str(base / "demo"), n_train=6, n_test_good=2, n_test_anomalous=3)
    refs = str(base / "refs")
    extract_reference_features("demo", root, refs, build_extractor(OFFLINE_BACKBONE), shots=2, classes=DEMO_UNSEEN)
    return {"root": root, "refs": refs, "base": base}


def run(script, *args):
    """The script in this process (tests/run_helpers.py: the exit status and output of a subprocess)."""
    return run_script(script, *args)


def main_args(demo, out, **overrides):
    options = {"--setting": "demo", "--train_dataset_dir": demo["root"], "--test_dataset_dir": demo["root"],
               "--test_ref_feature_dir": demo["refs"], "--backbone": OFFLINE_BACKBONE, "--num_ref_shot": 2,
               "--train_ref_shot": 2, "--train_ref_pool": 3, "--epochs": 1, "--stage1_epochs": 1,
               "--batch_size": 4, "--eval_batch_size": 8, "--coupling_layers": 2, "--num_embeddings": 64,
               "--num_workers": 0, "--device": "cpu", "--checkpoint_path": out, "--num_heatmaps": 0}
    options.update(overrides)
    return [item for key, value in options.items() if value is not None for item in (key, value)]


def assert_user_error(proc, *fragments, out=None, allowed=()):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    if out is not None:  # nothing written, not even an empty run folder (but the files in ``allowed``)
        written = [f for _, _, files in os.walk(out) for f in files if not f.endswith(tuple(allowed))]
        assert not written, written


def copy_root(demo, name):
    target = demo["base"] / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(demo["root"], target)
    return target


# --------------------------------------------------------------------------- datasets

def test_missing_root(demo, tmp_path):
    out = tmp_path / "out"
    assert_user_error(run("main.py", *main_args(demo, out, **{"--train_dataset_dir": tmp_path / "nowhere"})),
                      str(tmp_path / "nowhere"), "--train_dataset_dir", out=out)


def test_empty_root(demo, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert_user_error(run("main.py", *main_args(demo, out, **{"--test_dataset_dir": tmp_path / "empty"})),
                      "is empty", "--test_dataset_dir", out=out)


def test_root_with_another_layout(demo, tmp_path):
    for name in DEMO_SEEN:
        (tmp_path / "btad" / name / "train" / "ok").mkdir(parents=True)
    out = tmp_path / "out"
    assert_user_error(run("main.py", *main_args(demo, out, **{"--train_dataset_dir": tmp_path / "btad"})),
                      "BTAD layout", "synthetic demo was expected", out=out)


def test_unknown_setting_dataset_and_class(demo, tmp_path):
    out = tmp_path / "out"
    assert_user_error(run("main.py", *main_args(demo, out, **{"--setting": "mvtec_to_nowhere"})),
                      "mvtec_to_nowhere", "--setting", "visa_to_mvtec", out=out)
    assert_user_error(run("extract_ref_features.py", "--dataset", "imagenet", "--few_shot_dir", demo["root"],
                          "--save_dir", out, "--backbone", OFFLINE_BACKBONE), "unknown dataset 'imagenet'", out=out)
    assert_user_error(run("extract_ref_features.py", "--dataset", "demo", "--classes", "zebra", "--few_shot_dir",
                          demo["root"], "--save_dir", out, "--backbone", OFFLINE_BACKBONE), "zebra", out=out)


def test_class_folder_missing(demo, tmp_path):
    root = copy_root(demo, "no_weave")
    shutil.rmtree(root / "weave")
    out = tmp_path / "out"
    assert_user_error(run("main.py", *main_args(demo, out, **{"--test_dataset_dir": root})),
                      "'weave' not found", "--test_dataset_dir", out=out)


def test_anomalous_image_without_mask(demo, tmp_path):
    root = copy_root(demo, "no_mask")
    mask_dir = root / "pill" / "ground_truth"
    victim = sorted(mask_dir.rglob("*_mask.png"))[0]
    victim.unlink()
    out = tmp_path / "out"
    assert_user_error(run("main.py", *main_args(demo, out, **{"--train_dataset_dir": root})),
                      "no ground-truth mask", victim.name.replace("_mask", ""), out=out)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damage", ["truncated", "not_an_image"])
def test_broken_image_file(demo, tmp_path, damage, workers):
    root = copy_root(demo, f"broken_{damage}_{workers}")
    victim = sorted((root / "stripes" / "train" / "good").glob("*.png"))[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"this is not a png\n" * 20)
    out = tmp_path / "out"
    proc = run("main.py", *main_args(demo, out, **{"--train_dataset_dir": root, "--num_workers": workers}))
    # a training image is only decoded in epoch 1, after the run record of the started run
    assert_user_error(proc, str(victim), "truncated or not an image", out=out, allowed=("_run.json",))


# --------------------------------------------------------------------------- reference features

@pytest.mark.slow
def test_reference_features_of_another_backbone(demo, tmp_path):
    refs = tmp_path / "refs"
    shutil.copytree(demo["refs"], refs)
    for name in DEMO_UNSEEN:  # as the authors' files: no meta.json, wide_resnet50_2 channels
        (refs / name / "meta.json").unlink()
        for level, c in enumerate([256, 512, 1024], start=1):
            rows = np.load(refs / name / f"layer{level}.npy").shape[0]
            np.save(refs / name / f"layer{level}.npy", np.zeros((rows, c), np.float32))
    out = tmp_path / "out"
    assert_user_error(run("main.py", *main_args(demo, out, **{"--test_ref_feature_dir": refs})),
                      "another backbone", "--backbone tf_efficientnet_lite0", out=out)


def test_reference_features_with_fewer_shots_or_missing_layer(demo, tmp_path):
    out = tmp_path / "out"
    assert_user_error(run("main.py", *main_args(demo, out, **{"--num_ref_shot": 3})),
                      "--num_ref_shot 3", "only 2 shots", out=out)
    refs = tmp_path / "refs"
    shutil.copytree(demo["refs"], refs)
    (refs / "dots" / "layer2.npy").unlink()
    assert_user_error(run("main.py", *main_args(demo, out, **{"--test_ref_feature_dir": refs})),
                      "layer2.npy", out=out)


# --------------------------------------------------------------------------- flags and outputs

@pytest.mark.parametrize("flag, value, fragment", [
    ("--num_ref_shot", 0, "--num_ref_shot 0"),
    ("--train_ref_shot", 0, "--train_ref_shot 0"),
    ("--train_ref_shot", 99, "--train_ref_shot 99"),
    ("--batch_size", 1000, "--batch_size 1000"),
    ("--eval_batch_size", 0, "--eval_batch_size 0"),
    ("--device", "cuda:3", "--device cuda:3"),
])
def test_bad_flag_values(demo, tmp_path, flag, value, fragment):
    out = tmp_path / "out"
    assert_user_error(run("main.py", *main_args(demo, out, **{flag: value})), fragment, out=out)


def test_exclude_self_needs_one_more_training_image_than_shots(demo, tmp_path):
    out = tmp_path / "out"
    argv = main_args(demo, out, **{"--train_ref_shot": 3}) + ["--train_exclude_self"]  # the pool holds 3
    assert_user_error(run("main.py", *argv), "--train_ref_shot 3", "--train_exclude_self", out=out)


def test_output_folder_not_writable(demo, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert_user_error(run("main.py", *main_args(demo, blocker / "runs")), "--checkpoint_path", "is a file")
    assert_user_error(run("extract_ref_features.py", "--dataset", "demo", "--few_shot_dir", demo["root"],
                          "--save_dir", blocker / "refs", "--backbone", OFFLINE_BACKBONE, "--shots", 1),
                      "--save_dir", "is a file")


# --------------------------------------------------------------------------- resume

@pytest.fixture(scope="module")
def finished_run(demo):
    out = demo["base"] / "finished"
    proc = run("main.py", *main_args(demo, out, **{"--epochs": 1}))
    assert proc.returncode == 0, proc.stderr
    return out


def test_resume_rejects_foreign_or_broken_checkpoints(demo, finished_run, tmp_path):
    out = tmp_path / "out"
    ckpt = torch.load(finished_run / "demo" / "demo_latest.pth", weights_only=True)
    trained = ckpt["trained_on"]
    for change, fragment in [({"trained_on": dict(trained, setting="mvtec_to_visa")}, "--setting mvtec_to_visa"),
                             ({"trained_on": dict(trained, backbone="wide_resnet50_2", channels=[256, 512, 1024])},
                              "--backbone wide_resnet50_2")]:
        path = tmp_path / "foreign.pth"
        torch.save(dict(ckpt, **change), path)
        assert_user_error(run("main.py", *main_args(demo, out, **{"--resume": path})), str(path), fragment, out=out)
    marker = tmp_path / "payload_ran"
    crafted = tmp_path / "crafted.pth"
    torch.save(dict(ckpt, rng=Payload(marker)), crafted)
    assert_user_error(run("main.py", *main_args(demo, out, **{"--resume": crafted})), str(crafted), "refused",
                      out=out)
    assert not marker.exists()  # the payload never ran
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage")
    assert_user_error(run("main.py", *main_args(demo, out, **{"--resume": junk})), "cannot read", out=out)
    assert_user_error(run("main.py", *main_args(demo, out, **{"--resume": tmp_path / "none.pth"})),
                      "checkpoint not found", out=out)


def test_resume_refuses_other_model_options_naming_each(demo, finished_run, tmp_path):
    latest = finished_run / "demo" / "demo_latest.pth"
    out = tmp_path / "out"
    assert_user_error(run("main.py", *main_args(demo, out, **{"--resume": latest, "--clamp_alpha": 2.5})),
                      str(latest), "--clamp_alpha 1.9 (this run 2.5)", out=out)
    proc = run("main.py", *main_args(demo, out, **{"--resume": latest, "--clamp_alpha": 2.5, "--coupling_layers": 3,
                                                    "--residual": "difference"}))
    assert_user_error(proc, "--clamp_alpha 1.9 (this run 2.5)", "--coupling_layers 2 (this run 3)",
                      "--residual squared (this run difference)", out=out)


@pytest.mark.slow
def test_kill_and_resume_gives_the_uninterrupted_result(demo, tmp_path):
    settings = {"--epochs": 3, "--eval_freq": 1}
    straight = tmp_path / "straight"
    assert run("main.py", *main_args(demo, straight, **settings)).returncode == 0

    killed = tmp_path / "killed"
    latest = killed / "demo" / "demo_latest.pth"
    proc = subprocess.Popen([sys.executable, "main.py", *map(str, main_args(demo, killed, **settings))], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # during epoch 2 at the latest: no chance to clean up
    proc.wait()
    killed_after = torch.load(latest, weights_only=True)["epoch"]
    assert killed_after < 3
    for path in (killed / "demo").glob("*_metrics.csv"):  # every result present is complete
        assert len(pd.read_csv(path)) == len(DEMO_UNSEEN) + 1
    rows = pd.read_csv(killed / "demo" / "demo_history.csv")["epoch"].tolist()  # up to one row past the checkpoint
    assert rows[:killed_after] == list(range(1, killed_after + 1)) and len(rows) <= killed_after + 1
    for path in (killed / "demo").glob("*.json"):
        json.loads(path.read_text())
    resumed = run("main.py", *main_args(demo, killed, **settings, **{"--resume": None}), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert not list((killed / "demo").glob(".*.tmp"))  # temporaries of the killed run are swept

    final = "demo/demo_epoch3_metrics.csv"
    assert (straight / final).read_text() == (killed / final).read_text()
    a = torch.load(straight / "demo" / "demo_latest.pth", weights_only=True)
    b = torch.load(killed / "demo" / "demo_latest.pth", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["trainer"]["boundaries"] == b["trainer"]["boundaries"]
    assert json.loads((killed / "demo" / "demo_epoch3_metrics.json").read_text())["epoch"] == 3
    # the history holds every epoch once, as in the uninterrupted run; the record notes the resume
    a, b = (pd.read_csv(folder / "demo" / "demo_history.csv") for folder in (straight, killed))
    assert b["epoch"].tolist() == [1, 2, 3]
    same = ["stage", "vq_loss", "occ_loss", "flow_loss", "lr", "skipped_steps", *METRIC_NAMES]
    pd.testing.assert_frame_equal(a[same], b[same])
    record = json.loads((killed / "demo" / "demo_run.json").read_text())
    assert [r["after_epoch"] for r in record["resumes"]] == [killed_after]
    assert record["resumes"][0]["checkpoint"] == str(latest) and record["args"]["resume"] is None


@pytest.mark.slow
def test_ctrl_c_leaves_complete_files_and_says_how_to_resume(demo, tmp_path):
    out = tmp_path / "out"
    latest = out / "demo" / "demo_latest.pth"
    proc = subprocess.Popen([sys.executable, "main.py", *map(str, main_args(demo, out, **{"--epochs": 50}))],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)   # once: a press that a finalizer dropped is raised again by the loop
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stderr and "--resume" in stderr
    assert torch.load(latest, weights_only=True)["epoch"] >= 1


# --------------------------------------------------------------------------- presets

@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")   # the dropped one, on purpose
def test_a_ctrl_c_dropped_by_a_finalizer_is_raised_again_at_the_next_step():
    """The cause of a lost Ctrl-C: a KeyboardInterrupt raised inside a __del__ is printed and dropped by
    Python.  The press is recorded and the next step of a loop (utils.stages.staged) raises it again."""
    import gc

    from utils import errors
    from utils.stages import staged

    class Finalized:
        def __del__(self):
            errors._on_interrupt(signal.SIGINT, None)   # Ctrl-C arrives while a finalizer runs

    seen = []

    def main(argv):
        for item in staged(range(5), "loading"):
            seen.append(item)
            if item == 1:
                Finalized()          # dropped at once: "Exception ignored in ... KeyboardInterrupt"
                gc.collect()

    assert errors.run_cli(main, []) == errors.EXIT_INTERRUPTED and seen == [0, 1]
    assert errors.run_cli(lambda argv: list(staged(range(3), "x")), []) == 0   # a new run starts clean


def test_presets_set_defaults_and_explicit_flags_win():
    import main
    import main_extended_multi_shot
    import main_ib
    from utils.cli.presets import PRESETS

    recommended = PRESETS["recommended"]
    assert recommended  # the recommended recipe changes something
    plain = main.parse_args([])
    assert plain.preset == "authors" and (plain.anomaly_map, plain.image_score) == ("authors", "max")
    demo = main.parse_args(["--demo"])
    assert demo.preset == "recommended" and all(getattr(demo, k) == v for k, v in recommended.items())
    assert main.parse_args(["--demo", "--preset", "authors"]).anomaly_map == "authors"
    chosen = main_ib.parse_args(["--preset", "recommended", "--image_score", "max"])
    assert chosen.anomaly_map == recommended["anomaly_map"] and chosen.image_score == "max"
    assert main_extended_multi_shot.parse_args(["--preset", "recommended"]).anomaly_map == recommended["anomaly_map"]


@pytest.mark.slow
def test_eval_only_with_a_preset_scores_with_its_map_and_says_so(demo, finished_run, tmp_path):
    from utils.cli.presets import PRESETS

    record = json.loads((finished_run / "demo" / "demo_run.json").read_text())
    assert record["args"]["preset"] == "authors"
    latest = finished_run / "demo" / "demo_latest.pth"
    options = ["--eval_only", "--checkpoint", latest, "--setting", "demo", "--test_dataset_dir", demo["root"],
               "--test_ref_feature_dir", demo["refs"], "--num_ref_shot", 2, "--eval_batch_size", 8,
               "--num_workers", 0, "--device", "cpu", "--num_heatmaps", 0]
    recommended = PRESETS["recommended"]["anomaly_map"]
    for preset, extra, expected_map in (("recommended", [], recommended),
                                        ("recommended", ["--anomaly_map", "authors"], "fused")):
        out = tmp_path / f"{preset}{len(extra)}"
        proc = run("main.py", *options, "--checkpoint_path", out, "--preset", preset, *extra)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[0].startswith(f"preset {preset}: --anomaly_map {recommended}")
        metrics = pd.read_csv(out / "demo" / "demo_epoch1_metrics.csv")
        maps = pd.read_csv(out / "demo" / "demo_epoch1_maps.csv")
        chosen = maps[maps["Map"] == expected_map].drop(columns="Map").reset_index(drop=True)
        assert np.allclose(chosen.drop(columns="Class Name"), metrics.drop(columns="Class Name"), atol=1e-5)
