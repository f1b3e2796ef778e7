"""shot_sensitivity_analysis.py and classwise_failure.py on metrics CSVs written by the tests themselves."""
import os

import matplotlib
import numpy as np
import pandas as pd
import pytest

import classwise_failure
import shot_sensitivity_analysis
from utils.formats.run_outputs import metrics_csv_epochs as epoch_csvs
from utils.report.analysis_plots import fitted_limits
from utils.errors import UserError
from utils.formats.run_outputs import CSV_COLUMNS
from utils.metrics import METRIC_NAMES


def write_csv(path, classes, value_of, std=None):
    rows = [{"Class Name": c, **{m: value_of(c, m) for m in METRIC_NAMES}} for c in classes]
    frame = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    mean = frame[list(METRIC_NAMES)].mean().to_dict()
    frame = pd.concat([frame, pd.DataFrame([{"Class Name": "Mean", **mean}])], ignore_index=True)
    if std is not None:
        for m in METRIC_NAMES:
            frame[f"{m} std"] = std
    os.makedirs(os.path.dirname(path), exist_ok=True)
    frame.to_csv(path, index=False, float_format="%.5f")
    return frame


def make_runs(root, setting, shots, epochs, base, std=None):
    """Per k, CSVs of several epochs; the Mean of epoch E at k shots is base + k/100 + E/1000."""
    for k in shots:
        run = f"{setting}_{k}shot"
        for e in epochs:
            offset = base + k / 100 + e / 1000
            write_csv(os.path.join(root, run, f"{run}_epoch{e}_metrics.csv"), ["a", "b"],
                      lambda c, m: offset + (0.01 if c == "a" else -0.01), std)


def test_epoch_csvs_are_ordered_by_number_not_text(tmp_path):
    for e in (9, 19, 100, 2):
        (tmp_path / f"run_epoch{e}_metrics.csv").write_text("x")
    (tmp_path / "run_2shot_epoch50_metrics.csv").write_text("x")  # another run: ignored
    assert [e for e, _ in epoch_csvs(str(tmp_path), "run")] == [2, 9, 19, 100]


def test_shot_sensitivity_latest_epoch_several_settings_std_and_missing_shots(tmp_path, capsys):
    make_runs(tmp_path, "x_to_y", [2, 4, 6], epochs=[9, 19], base=0.8)
    make_runs(tmp_path, "p_to_q", [2, 4], epochs=[3], base=0.6, std=0.02)
    out = tmp_path / "fig" / "shots.png"
    shot_sensitivity_analysis.main(["--checkpoint_dir", str(tmp_path), "--setting", "x_to_y", "p_to_q",
                                    "--shots", "2", "4", "6", "8", "--out", str(out)])
    assert "p_to_q_6shot" in capsys.readouterr().err  # missing folder: a warning naming it
    assert out.is_file() and out.stat().st_size > 0
    table = pd.read_csv(tmp_path / "fig" / "shots.csv")
    x = table[(table.setting == "x_to_y") & (table.metric == "Image AUC")]
    assert x["shots"].tolist() == [2, 4, 6]
    assert (x["epoch"] == 19).all()  # epoch19, not the lexicographically later epoch9
    np.testing.assert_allclose(x["value"], [0.8 + k / 100 + 0.019 for k in (2, 4, 6)], atol=1e-5)
    assert x["std"].isna().all()
    p = table[(table.setting == "p_to_q") & (table.metric == "Pixel AUC")]
    assert p["shots"].tolist() == [2, 4] and np.allclose(p["std"], 0.02)
    assert set(table["metric"]) == {"Image AUC", "Pixel AUC"}
    # an explicit epoch, and a CSV missing for one k is a warning naming it
    os.remove(tmp_path / "x_to_y_4shot" / "x_to_y_4shot_epoch9_metrics.csv")
    shot_sensitivity_analysis.main(["--checkpoint_dir", str(tmp_path), "--setting", "x_to_y", "--epoch", "9",
                                    "--out", str(out)])
    assert "x_to_y_4shot_epoch9_metrics.csv not found" in capsys.readouterr().err
    assert pd.read_csv(tmp_path / "fig" / "shots.csv")["shots"].unique().tolist() == [2, 6]


def test_shot_sensitivity_nothing_to_plot_is_an_error(tmp_path):
    make_runs(tmp_path, "x_to_y", [2], epochs=[1], base=0.8)
    with pytest.raises(UserError, match="nothing to plot"):
        shot_sensitivity_analysis.main(["--checkpoint_dir", str(tmp_path), "--setting", "nope",
                                        "--shots", "2", "--out", str(tmp_path / "o.png")])
    with pytest.raises(UserError, match="unknown metric"):
        shot_sensitivity_analysis.main(["--checkpoint_dir", str(tmp_path), "--metrics", "AUROC",
                                        "--out", str(tmp_path / "o.png")])
    assert not (tmp_path / "o.png").exists()


def test_fitted_limits_follow_the_data():
    lo, hi = fitted_limits(0.62, 0.71)
    assert 0.5 < lo < 0.62 and 0.71 < hi < 0.8
    assert fitted_limits(0.95, 1.0)[1] < 1.02
    assert fitted_limits(0.01, 0.5)[0] == 0.0


def test_classwise_bars_sorted_worst_in_red_and_a_poor_class_stays_visible(tmp_path, monkeypatch):
    values = {"good": 0.97, "fine": 0.93, "ok": 0.90, "meh": 0.85, "poor": 0.31}
    csv = tmp_path / "run_epoch5_metrics.csv"
    write_csv(str(csv), list(values), lambda c, m: values[c])
    captured = {}
    original = matplotlib.figure.Figure.savefig

    def keep(fig, *a, **k):
        captured["fig"] = fig
        return original(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    monkeypatch.setattr(matplotlib.pyplot, "show", lambda *a, **k: pytest.fail("plt.show() called"))
    out = tmp_path / "cw.png"
    classwise_failure.main(["--csv", str(csv), "--top_k", "2", "--out", str(out)])
    assert matplotlib.get_backend().lower() == "agg"
    ax = captured["fig"].axes[0]
    bars = sorted(ax.patches, key=lambda p: -p.get_y())  # top to bottom
    assert [round(b.get_width(), 5) for b in bars] == sorted(values.values(), reverse=True)
    reds = [matplotlib.colors.to_hex(b.get_facecolor()) == matplotlib.colors.to_hex("tab:red") for b in bars]
    assert reds == [False, False, False, True, True]
    left, right = ax.get_xlim()
    assert left < 0.31 - 0.02 and right > 0.97  # the poor class is drawn, the best is not cut
    mean = np.mean(list(values.values()))
    assert any(np.allclose(line.get_xdata(), mean, atol=1e-4) for line in ax.get_lines())  # the Mean line
    assert len(ax.patches) == len(values)  # no bar for the Mean row
    texts = [t.get_text() for t in ax.texts]
    assert "0.310" in texts and "0.970" in texts
    numbers = pd.read_csv(tmp_path / "cw.csv")
    assert numbers["Class Name"].tolist() == ["good", "fine", "ok", "meh", "poor"]


def test_classwise_compare_draws_both_runs_and_the_difference(tmp_path):
    a = {"c1": 0.9, "c2": 0.7, "c3": 0.8}
    b = {"c1": 0.92, "c2": 0.6, "c3": 0.85}
    write_csv(str(tmp_path / "a.csv"), list(a), lambda c, m: a[c])
    write_csv(str(tmp_path / "b.csv"), list(b), lambda c, m: b[c])
    classwise_failure.main(["--csv", str(tmp_path / "a.csv"), "--compare", str(tmp_path / "b.csv"),
                            "--labels", "2-shot", "8-shot", "--metric", "Image AUC", "--out", str(tmp_path / "c.png")])
    numbers = pd.read_csv(tmp_path / "c.csv").set_index("Class Name")
    for c in a:
        assert numbers.loc[c, "difference"] == pytest.approx(b[c] - a[c], abs=1e-5)
    assert (tmp_path / "c.png").stat().st_size > 0
    with pytest.raises(UserError, match="--metric: unknown metric"):
        classwise_failure.main(["--csv", str(tmp_path / "a.csv"), "--metric", "AUC", "--out", str(tmp_path / "d.png")])
    with pytest.raises(UserError, match="--csv .*missing.csv: file not found"):
        classwise_failure.main(["--csv", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "d.png")])
    assert not (tmp_path / "d.png").exists()
