"""``python -m maenas_ray.report``: the sweep report (PNGs and index.html).

Here on fabricated experiments: one on a filesystem standing in for S3 (no study journal,
so history and importances are rebuilt from the trials), bad input, and the page rendered
in headless Chromium when it is installed. The report of a real sweep, with its Optuna
journal, is checked in tests/test_sweep.py.
"""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import matplotlib.image
import numpy as np
import pyarrow.fs
import pytest
import yaml

from maenas_ray.config import load_config
from maenas_ray.report import main, write_report
from maenas_ray.results import load_experiment
from maenas_ray.space import PUBLISHED
from maenas_ray.viz import save_cell_drawings

GENOTYPES = [PUBLISHED[n] for n in ("DARTS_V1", "DARTS_V2", "PC_DARTS", "DARTS_V2")]
# (id, decoder, mask_ratio, eval_loss, skip_count, status)
TRIALS = [
    ("a", "hierarchical", 0.3, 0.50, 1, "done"),
    ("b", "hierarchical", 0.7, 0.40, 2, "done"),
    ("c", "plain", 0.3, 0.45, 3, "done"),
    ("d", "plain", 0.7, 0.60, 6, "unfinished"),
]


def ablation(root):
    """A 2 x 2 decoder x mask-ratio experiment as the sweep writes it (epochs 2)."""
    root.mkdir(parents=True)
    cfg = load_config(None, ["objective.metric=eval_loss", "search.epochs=2"])
    saved = cfg.to_dict()
    saved["space"] = {"decoder": {"choice": ["hierarchical", "plain"]},
                      "mask_ratio": {"low": 0.3, "high": 0.7}}  # fmt: skip
    (root / "sweep_config.yaml").write_text(yaml.safe_dump(saved))
    for (tid, decoder, ratio, loss, skips, status), genotype in zip(TRIALS, GENOTYPES, strict=True):
        d = root / f"trial_{tid}"
        d.mkdir()
        (d / "params.json").write_text(
            json.dumps({"search": {"decoder": decoder, "mask_ratio": ratio}})
        )
        rows = [{"epoch": e, "eval_loss": loss + 0.1 * (2 - e), "skip_count": skips,
                 "alpha_entropy": 2.07 if tid == "a" else 2.0 - 0.1 * e,
                 "hessian_eigenvalue": 0.1 * e * (1 + skips),
                 "genotype": genotype.to_json()} for e in (1, 2)]  # fmt: skip
        if tid == "c":  # stopped early on collapse at its last epoch, keeping the first
            rows[-1].update(stopped_early=True, kept_epoch=1, stop_reason="the eigenvalue grew")
        if status == "unfinished":
            rows = rows[:1]
        (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        save_cell_drawings(d / "cells.png", genotype)
    return root


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.headings, self._tag = [], [], None

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        if self._tag == "h2" and data.strip():
            self.headings.append(data.strip())
        self._tag = None


def read_page(index):
    page = Page()
    page.feed(index.read_text())
    return page


def test_a_report_of_an_experiment_on_object_storage(tmp_path):
    ablation(tmp_path / "bucket" / "sweeps" / "abl")
    bucket = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"), pyarrow.fs.LocalFileSystem())
    exp = load_experiment("sweeps/abl", filesystem=bucket)
    assert exp.study() is None  # no journal: the study lived in Ray's memory
    index = write_report(exp, tmp_path / "report", top=2)
    page = read_page(index)
    assert page.headings == [
        "Leaderboard",
        "eval_loss against each tuned parameter",
        "The label-free score against accuracy",
        "Optimisation history",
        "Parameter importances",
        "Skip connections against mask ratio, per decoder (the collapse picture)",
        "Collapse over time: skip connections, α entropy and curvature per epoch",
        "The best genotypes by eval_loss",
    ]
    # the best two finished trials first (b 0.40, c 0.45), their cells copied next to the page
    assert page.images == [
        "objective_vs_params.png", "history.png", "importances.png", "skips_vs_mask_ratio.png",
        "collapse_over_time.png", "best/1-trial_b-cells.png", "best/2-trial_c-cells.png",
    ]  # fmt: skip
    for src in page.images:
        picture = matplotlib.image.imread(tmp_path / "report" / src)
        assert picture.ndim == 3 and picture.shape[0] > 100 and picture.std() > 0.01, src
    text = index.read_text()
    assert "rebuilt from the trials&#x27; eval_loss" in text and "3 completed trials" in text
    assert "unfinished@1" in text and "4 trials (3 done, 1 unfinished)" in text
    # an eval_loss sweep has no accuracy to correlate with, and says why; importances from
    # three trials carry a caveat
    assert (
        "Kendall τ(−eval_loss, proxy_top1): no number (the sweep&#x27;s objective is "
        "eval_loss: its trials run no proxy retrain" in text
    )
    assert "caveat: from 3 trials; importances need about 10" in text
    # the leaderboard's notes: α close to uniform in trial a, trial c stopped early
    assert "note: 1 of 4 trials ended with α close to uniform" in text and "a 2.070" in text
    assert "done, early@2-&gt;1" in text
    assert (
        "trial c stopped early after epoch 2 (the eigenvalue grew); its genotype is that "
        "of epoch 1" in text
    )
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td>", text)
    # ranked by the last eval_loss: d (unfinished) has one from its first epoch
    assert rows == [("1", "b"), ("2", "c"), ("3", "a"), ("4", "d")]
    assert repr(PUBLISHED["DARTS_V2"]).replace("'", "&#x27;") in text


def test_report_cli_writes_into_the_experiment_and_refuses_bad_input(tmp_path, capsys):
    root = ablation(tmp_path / "abl")
    assert main([str(root)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {root / 'report' / 'index.html'}"
    assert (root / "report" / "skips_vs_mask_ratio.png").is_file()
    (tmp_path / "plain").mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(root / "sweep_config.yaml", empty)
    (tmp_path / "file").write_text("")
    cases = [
        ([str(tmp_path / "plain")], "is not a sweep experiment: no sweep_config.yaml"),
        ([str(tmp_path / "nope")], "is not a directory (expected a sweep experiment)"),
        ([str(empty)], "has no trials yet: nothing to report"),
        ([str(root), "--top", "0"], "--top 0: must be >= 1"),
        ([str(root), "--out", str(tmp_path / "file")], "cannot write the report there"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium not installed")
def test_the_report_renders_in_headless_chromium(tmp_path):
    index = write_report(load_experiment(str(ablation(tmp_path / "abl"))), tmp_path / "r")
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--window-size=1200,2400", f"--screenshot={shot}", index.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    picture = matplotlib.image.imread(shot)
    assert picture.shape[:2] == (2400, 1200)
    # the figures were loaded: many distinct colours, not a blank or text-only page
    colours = np.unique((picture[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 500
