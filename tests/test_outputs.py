"""What a run leaves for its reader: the headline, the Recall-vs-N figure, the filtered console
warnings and the one-run-per-folder guard (checked against hand-made inputs, not the code's own
output)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from cxr_relink.audit import result as R
from cxr_relink.audit.embeddings import EmbeddingSet
from cxr_relink.audit.relinkage import relinkage_audit
from cxr_relink.configs.console import quiet_known_warnings
from cxr_relink.callbacks.run_dir import check_run_dir
from tests.conftest import ROOT


def _row(k, n, n_value, value, chance, pool=None):
    return {"k": k, "n": n, "n_value": n_value, "value": value, "chance": chance, "x_chance": value / chance,
            "effective_pool_mean": pool or n_value, "frac_queries_pool_below_n": 0.0}


def _section(rows, variant="plain", clipped=()):
    return {"direction": "i2t", "variant": variant, "n_queries": 500, "n_candidates": 400, "ties_policy": "pessimistic",
            "ties": {"n_queries_with_ties": 0}, "rank": {"mrr": 0.2, "median_rank": 9}, "recall": rows,
            "clipped_n": list(clipped)}


def test_headline_reads_r1_at_100_hard_negatives_probe_and_where(tmp_path) -> None:
    res = R.build_result(
        relinkage={"i2t": _section([_row(1, "100", 100, 0.1283, 0.01), _row(1, "full", 400, 0.05, 0.0025)]),
                   "hardneg/i2t": {**_section([_row(1, "100", 100, 0.05, 0.025, pool=40.0)], "hardneg"),
                                   "label_mapping": "blank_negative", "n_label_groups": 3, "population_median": 40,
                                   "n_queries_no_negatives": 0}},
        probe={"macro_auroc": 0.747, "per_label": {}, "n_labels_evaluated": 0, "n_train": 1, "n_test": 1,
               "uncertainty_policy": {}},
        meta={"split": "test", "model": "M", "checkpoint": "/x/checkpoints/epoch_005.ckpt", "epoch": 5},
    )
    text = R.headline(res, tmp_path / "final_audit")
    assert "R@1 at N = 100: 12.83% = 12.83× chance (1.00%)" in text
    assert "hard negatives: 5.00% = 2.00× chance (mean effective pool 40; chance 2.50% is the mean of 1/pool" in text
    assert "macro AUROC 74.70%" in text and "checkpoint=epoch_005.ckpt, epoch=5 (0-based)" in text
    assert f"{tmp_path / 'final_audit'}/" in text
    summary = R.console_summary(res, tmp_path)
    assert summary.count("Full results") == 1 and summary.count("## Re-linkage audit") == 1
    assert "| image→report | 1 | 100 | 12.83 |" in summary  # then the table, once


def test_plot_is_x_chance_on_log_axes_with_effective_pools_and_clipped_n() -> None:
    g = torch.Generator().manual_seed(0)
    n = 60
    img = torch.randn(n, 8, generator=g)
    rep = img + 0.8 * torch.randn(n, 8, generator=g)
    labels = np.zeros((n, 14), dtype=np.float32)
    for bit in range(4):  # 12 label groups of 5 studies: label-matched pools smaller than N = 10
        labels[:, bit] = (np.arange(n) % 12 >> bit) & 1
    es = EmbeddingSet.from_items(img, rep, np.arange(n), np.arange(n), labels)
    rel = relinkage_audit(es, ks=[1, 5], ns=[10, 100, "full"], hardneg=True, n_boot=20)
    res = R.build_result(relinkage=rel, meta={"split": "test", "model": "M", "checkpoint": "epoch_003.ckpt", "epoch": 3})
    fig = R.plot_recall_vs_n(res)
    axes = fig.axes
    assert [ax.get_xscale() for ax in axes] == ["log"] * 3 and [ax.get_yscale() for ax in axes] == ["log"] * 3
    assert "split=test" in fig._suptitle.get_text() and "epoch_003.ckpt" in fig._suptitle.get_text()
    for ax, key in zip(axes, rel):
        rows = sorted((r for r in rel[key]["recall"] if r["k"] == 1), key=lambda r: r["effective_pool_mean"])
        line = next(l for l in ax.get_lines() if l.get_label() == "K=1")
        xs, ys = line.get_data()
        want_x = [r["effective_pool_mean"] if key == "hardneg/i2t" else r["n_value"] for r in rows]
        assert list(xs) == pytest.approx(want_x)
        assert list(ys) == pytest.approx([max(r["value"] / r["chance"], 1e-2) for r in rows])  # recall ÷ chance
        notes = " ".join(t.get_text() for t in ax.texts)
        assert "N = 100 ≥ candidates" in notes  # 60 studies: N = 100 is clipped and said so
    # the hard-negative pools are smaller than nominal N: plotted where they are
    hard = [r for r in rel["hardneg/i2t"]["recall"] if r["k"] == 1 and r["n"] == "10"][0]
    assert hard["effective_pool_mean"] < 10


def test_known_harmless_warnings_are_filtered_others_kept() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        warnings.warn("Optimal order is the largest alpha. Please consider expanding the range of alphas.")
        warnings.warn("Secure RNG turned off. This is perfectly fine for experimentation")
        warnings.warn("Found 82 module(s) in eval mode at the start of training. This may lead to unexpected behavior")
        warnings.warn("something the user must see")
    assert [str(w.message) for w in caught] == ["something the user must see"]


def test_run_dir_guard(tmp_path) -> None:
    check_run_dir(tmp_path / "new")  # absent: fine
    (tmp_path / "empty").mkdir()
    check_run_dir(tmp_path / "empty")  # empty: fine
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("first run")
    (run / "checkpoints").mkdir()
    with pytest.raises(FileExistsError, match="already holds another run"):
        check_run_dir(run)
    with pytest.raises(FileExistsError):  # a checkpoint from elsewhere is not a resume in place
        check_run_dir(run, tmp_path / "other" / "last.ckpt")
    check_run_dir(run, run / "checkpoints" / "last.ckpt")  # resume in place: allowed, history kept
    assert (run / ".hydra.before_resume_1" / "config.yaml").read_text() == "first run"
    assert not (run / ".hydra").exists()


@pytest.mark.parametrize("config_name", ["train.yaml", "evaluate.yaml"])
def test_runs_started_in_the_same_second_get_two_folders(config_name, tmp_path) -> None:
    """The default run and multirun folders are told apart below the second (two `python train.py &`
    in one second used to share one folder, and the second was refused)."""
    import re
    from datetime import datetime

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from tests.conftest import compose_config

    compose_config(config_name, [], tmp_path)
    node = OmegaConf.to_container(HydraConfig.get(), resolve=False)
    for key in ("run", "sweep"):
        pattern = re.fullmatch(r".*\$\{now:([^}]*)\}", node[key]["dir"]).group(1)
        a, b = (datetime(2026, 12, 5, 13, 7, 26, us).strftime(pattern) for us in (1000, 2000))
        assert a != b, f"hydra.{key}.dir: two starts 1 ms apart give the same folder {a}"
    # and the guard offers a resume only where a run left a checkpoint to resume from
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    with pytest.raises(FileExistsError) as e:
        check_run_dir(run)
    assert "ckpt_path" not in str(e.value)


@pytest.mark.slow
def test_second_cli_run_into_a_used_folder_is_refused_before_writing(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("first run\n")
    p = subprocess.run([sys.executable, "train.py", f"hydra.run.dir={run}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0 and "already holds another run" in p.stderr
    assert sorted(x.name for x in run.iterdir()) == ["train.log"]  # nothing written, nothing overwritten
    assert (run / "train.log").read_text() == "first run\n"


def test_config_mistakes_are_explained_with_the_valid_choices() -> None:
    from cxr_relink.configs.cli import explain

    assert "Did you mean model?" in explain("train.yaml", ["modle=bert_encoder"])
    said = explain("train.yaml", ["data.root=/data/cohort"])  # a real cohort's key, the synthetic cohort chosen
    assert "data=synthcxr option has no such key" in said
    assert all(f"data={c}" in said for c in ("mimic_cxr", "chexpert_plus", "openi"))
    assert "Did you mean bert_encoder" in explain("train.yaml", ["model=bert_encodr"])
    assert "Did you mean trainer.max_epochs?" in explain("train.yaml", ["trainer.max_epocs=2"])
    assert "Did you mean hardneg?" in explain("evaluate.yaml", ["audit=hardnegs"])
    assert explain("train.yaml", ["data=mimic_cxr", "data.root=/x", "seed=3"]) is None  # nothing wrong


@pytest.mark.parametrize("argv, says", [
    (["train.py", "modle=llm_encoder"], "'modle' is neither a config group nor a key of train.yaml. Did you mean model?"),
    (["evaluate.py"], "give exactly one of ckpt_path="),
    (["evaluate.py", "embeddings=/nonexistent/e.npz"], "embeddings=/nonexistent/e.npz: no such file"),
])
@pytest.mark.slow
def test_cli_usage_mistakes_end_in_one_clear_line_and_exit_status_2(argv, says, tmp_path) -> None:
    p = subprocess.run([sys.executable, *argv, f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "HYDRA_FULL_ERROR" not in p.stderr and "Error executing job" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and says in last


def _foreign_files(tmp_path):
    import pickle

    foreign = tmp_path / "foreign.ckpt"
    foreign.write_bytes(pickle.dumps({"not": "a checkpoint"}, protocol=2))  # (torch warns about newer protocols)
    return foreign


@pytest.mark.parametrize("argv, says", [
    (["train.py", "data=mimic_cxr"], "data.root is not set"),  # a mandatory value (???) left unset
    (["evaluate.py", "ckpt_path={foreign}"], "checkpoint {foreign} cannot be loaded safely"),  # models/checkpoint.py's guard
    (["evaluate.py", "ckpt_path={foreign}", "split=testt"], "split=testt: no such split of the cohort; choose one of "
     "train, val, test (did you mean split=test?)"),
    (["evaluate.py", "embeddings={foreign}"], "embeddings file {foreign} is not a readable .npz of arrays"),
])
@pytest.mark.slow
def test_refusals_inside_a_run_are_one_line_and_exit_status_2(argv, says, tmp_path) -> None:
    """Guards and data errors raised inside the task: one line naming the key or file, no Hydra traceback."""
    foreign = _foreign_files(tmp_path)
    argv = [a.format(foreign=foreign) for a in argv]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    p = subprocess.run([sys.executable, *argv, f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=env)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "Error executing job" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and says.format(foreign=foreign) in lines[0], p.stderr


@pytest.mark.slow
def test_hydra_full_error_shows_the_traceback_of_a_refusal(tmp_path) -> None:
    foreign = _foreign_files(tmp_path)
    p = subprocess.run([sys.executable, "evaluate.py", f"ckpt_path={foreign}", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert p.returncode == 1 and "Traceback" in p.stderr and "cannot be loaded safely" in p.stderr


def test_refusal_tells_guards_from_bugs() -> None:
    """A ValueError/KeyError/FileNotFoundError our code raised on purpose is a refusal (its message); one
    Python or a library raised for a statement that went wrong is a bug (None: the traceback stays)."""
    import numpy as np
    from hydra.errors import InstantiationException

    from cxr_relink.configs.cli import UsageError, refusal

    def caught(f):
        try:
            f()
        except Exception as e:  # noqa: BLE001
            return e
        raise AssertionError("no exception")

    def guard():
        raise ValueError("data.text_field must be one of (...), got 'x'\n  (a second line)")

    def missing():
        raise FileNotFoundError("image file /x.png does not exist")

    def wrapped():
        try:
            guard()
        except ValueError as e:
            raise InstantiationException("Error in call to target 'datamodules.X'") from e

    assert refusal(caught(guard)) == "data.text_field must be one of (...), got 'x' (a second line)"
    assert refusal(caught(missing)) == "image file /x.png does not exist"
    assert refusal(caught(wrapped)) == "data.text_field must be one of (...), got 'x' (a second line)"
    assert refusal(UsageError("split=x: no such split")) == "split=x: no such split"
    assert refusal(caught(lambda: int("x"))) is None  # Python's, for a statement that went wrong
    assert refusal(caught(lambda: {}["key"])) is None
    assert refusal(caught(lambda: np.zeros(3) + np.zeros(4))) is None  # a library's
    assert refusal(caught(lambda: (_ for _ in ()).throw(TypeError("bug")))) is None
    assert refusal(InstantiationException("Error in call to target")) is None  # nothing of ours underneath


def test_train_refuses_a_missing_checkpoint_before_any_work(compose_train) -> None:
    from cxr_relink.configs.cli import UsageError
    from train import train

    with pytest.raises(UsageError, match="ckpt_path=/nonexistent/last.ckpt: no such checkpoint file"):
        train(compose_train("ckpt_path=/nonexistent/last.ckpt"))


def test_lightning_lines_print_once_through_the_run_handlers() -> None:
    """Lightning adds its own console handler; under Hydra's logging every Lightning line printed twice."""
    import io
    import logging

    import lightning

    root, lit = logging.getLogger(), logging.getLogger("lightning")
    ours, theirs = io.StringIO(), io.StringIO()
    run_handler = logging.StreamHandler(ours)
    lightning._console.setStream(theirs)  # Lightning's handler, as after `import lightning` under Hydra
    saved = (list(lit.handlers), lit.propagate, root.level)
    # An earlier in-process Hydra run (tests/test_reproduce.py) configures logging with
    # disable_existing_loggers, which disables Lightning's loggers created before it: not what is tested here.
    chain = [logging.getLogger(n) for n in ("lightning", "lightning.fabric", "lightning.fabric.utilities",
                                             "lightning.fabric.utilities.seed")]
    disabled = [lg.disabled for lg in chain]
    for lg in chain:
        lg.disabled = False
    lit.addHandler(lightning._console)
    root.addHandler(run_handler)
    root.setLevel(logging.INFO)
    try:
        quiet_known_warnings()
        logging.getLogger("lightning.fabric.utilities.seed").info("Seed set to 7")
    finally:
        root.removeHandler(run_handler)
        root.setLevel(saved[2])
        lit.handlers[:] = saved[0]
        lit.propagate = saved[1]
        for lg, d in zip(chain, disabled):
            lg.disabled = d
    assert (ours.getvalue() + theirs.getvalue()).count("Seed set to 7") == 1 and "Seed set to 7" in ours.getvalue()


@pytest.mark.parametrize("ratios, minor_labels", [([1.5, 4.0, 30.0, 70.0], True), ([0.05, 3.0, 400.0, 9000.0], False)])
def test_plot_y_axis_labels_every_decade_and_minor_ticks(ratios, minor_labels) -> None:
    """Recall ÷ chance panels: a label at each decade in view (1× and 10× alone used to be labelled),
    2× and 5× ticks between, labelled while the view spans at most three decades."""
    import math

    rows = [_row(1, str(n), n, min(1.0, x * 1 / n), 1 / n) for n, x in zip((10, 100, 1000, 10000), ratios)]
    fig = R.plot_recall_vs_n(R.build_result(relinkage={"i2t": _section(rows)}, meta={"split": "test"}))
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()

    def shown(minor: bool) -> dict[float, str]:
        ticks = ax.yaxis.get_minor_ticks() if minor else ax.yaxis.get_major_ticks()
        locs = ax.yaxis.get_minorticklocs() if minor else ax.yaxis.get_majorticklocs()
        return {float(v): t.label1.get_text() for v, t in zip(locs, ticks) if lo <= v <= hi and t.label1.get_visible()}

    decades = [10.0**e for e in range(math.ceil(math.log10(lo) - 1e-9), math.floor(math.log10(hi) + 1e-9) + 1)]
    assert len(decades) >= 2
    major = shown(minor=False)
    assert [major[v] for v in sorted(major)] == [f"{d:g}×" for d in decades]
    minor = shown(minor=True)
    want = [f"{m * 10.0**e:g}×" for e in range(-3, 6) for m in (2, 5) if lo <= m * 10.0**e <= hi]
    assert [minor[v] or "" for v in sorted(minor)] == (want if minor_labels else [""] * len(want))
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_report_quality_alone_claims_no_plot_and_no_empty_relinkage_heading(tmp_path) -> None:
    rq = {"mode": "top1", "k": 1, "n_queries": 5, "n_database_reports": 9, "database": "train", "note": "test"}
    res = R.build_result(report_quality=rq, meta={"split": "test", "model": "M"})
    R.write_bundle(res, tmp_path)
    said = R.console_summary(res, tmp_path)
    assert "recall_vs_n.png" not in said and not (tmp_path / "recall_vs_n.png").exists()
    assert "Re-linkage" not in said and "Re-linkage" not in (tmp_path / "report.md").read_text()
    assert "## Retrieved-report quality" in said
