"""``python -m maenas_ray.report``: the sweep report (PNGs and index.html).

Here on fabricated experiments: one on a filesystem standing in for S3 (no study journal,
so history and importances are rebuilt from the trials), one of the proxy objective with
full retrains, which draws every figure of the report, bad input, and that page rendered
in headless Chromium when it is installed. The report of a real sweep, with its Optuna
journal, is checked in tests/test_sweep.py.
"""

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import matplotlib.image
import numpy as np
import pyarrow.fs
import pytest
import torch
import yaml

from maenas_ray.config import load_config
from maenas_ray.report import main, write_report
from maenas_ray.results import load_experiment
from maenas_ray.space import PUBLISHED
from maenas_ray.viz import save_cell_drawings, save_reconstruction_grid

GENOTYPES = [PUBLISHED[n] for n in ("DARTS_V1", "DARTS_V2", "PC_DARTS", "DARTS_V2")]
# (id, decoder, mask_ratio, eval_loss, skip_count, status)
TRIALS = [
    ("a", "hierarchical", 0.3, 0.50, 1, "done"),
    ("b", "hierarchical", 0.7, 0.40, 2, "done"),
    ("c", "plain", 0.3, 0.45, 3, "done"),
    ("d", "plain", 0.7, 0.60, 6, "unfinished"),
]


# with the proxy objective: each trial's proxy_top1, and the top-1 of its full retrain
PROXY_TOP1 = {"a": 0.62, "b": 0.70, "c": 0.55}
RETRAIN_TOP1 = {"a": 0.80, "b": 0.90, "c": 0.85}


def ablation(root, proxy=False):
    """A 2 x 2 decoder x mask-ratio experiment as the sweep writes it (epochs 2).

    With ``proxy`` its objective is proxy_top1: the finished trials end with a proxy
    retrain's report, carry a reconstruction grid, and have been fully retrained
    (``retrains/<trial id>.json``), so that every figure of the report is drawn."""
    root.mkdir(parents=True)
    objective = "proxy_top1" if proxy else "eval_loss"
    cfg = load_config(
        None, [f"objective.metric={objective}", "search.epochs=2", "retrain.proxy_epochs=1"]
    )
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
        if proxy:  # NaN while searching; the proxy retrain repeats the search's last metrics
            for r in rows:
                r["proxy_top1"] = float("nan")
            if status == "done":
                rows.append({**rows[-1], "proxy_epoch": 1, "proxy_top1": PROXY_TOP1[tid]})
                (root / "retrains").mkdir(exist_ok=True)
                (root / "retrains" / f"{tid}.json").write_text(
                    json.dumps({"top1": RETRAIN_TOP1[tid], "epoch": 3})
                )
                x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(ord(tid)))
                masked = x.clone()
                masked[..., :8, :] = 0.0
                save_reconstruction_grid(
                    d / "reconstruction.png", x, masked, 0.5 * x, [0.5] * 3, [0.25] * 3
                )
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
    assert text.count("Kendall τ(") == 1  # under the leaderboard only
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


#: the report's figures of a proxy sweep with full retrains, in the page's order: all of them
EVERY_FIGURE = [
    "objective_vs_params.png", "score_vs_accuracy.png", "history.png", "importances.png",
    "skips_vs_mask_ratio.png", "collapse_over_time.png",
    "best/1-trial_b-cells.png", "best/1-trial_b-reconstruction.png",
    "best/2-trial_a-cells.png", "best/2-trial_a-reconstruction.png",
    "best/3-trial_c-cells.png", "best/3-trial_c-reconstruction.png",
]  # fmt: skip


def test_a_report_of_a_proxy_sweep_draws_every_figure(tmp_path):
    exp = load_experiment(str(ablation(tmp_path / "abl", proxy=True)))
    assert [t.status for t in exp.trials()] == ["done", "done", "done", "unfinished"]
    index = write_report(exp, tmp_path / "r")
    page = read_page(index)
    assert page.images == EVERY_FIGURE
    for src in page.images:
        picture = matplotlib.image.imread(tmp_path / "r" / src)
        assert picture.ndim == 3 and picture.shape[0] > 100 and picture.std() > 0.01, src
    text = index.read_text()
    # τ and ρ once each, under the leaderboard (b > c > a by −eval_loss; b > a > c by
    # proxy_top1; the retrains agree with eval_loss), and not again under the scatter
    leaderboard, _, rest = text.partition("<h2>proxy_top1 against each tuned parameter</h2>")
    assert (
        "Kendall τ(−eval_loss, proxy_top1) = 0.333 (Spearman ρ = 0.500, p = 1, n = 3 trials); "
        "left out: 1 unfinished" in leaderboard
    )
    assert "Kendall τ(−eval_loss, retrain_top1) = 1.000 (Spearman ρ = 1.000" in leaderboard
    assert "Kendall τ(" not in rest and "are under the leaderboard" in rest
    # the eigenvalue's lead over the skip count is what RobustDARTS reported, to look for
    assert "RobustDARTS (Zela et al. 2020) reported, at paper scale" in rest
    assert "a small or short search may show none" in rest
    assert "rises before the skip count does" not in text


def _chromium(*args):
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


#: appended to a copy of the page: once it has loaded, each image's natural width and its
#: box on the page, and the page's height, written into the DOM (read by --dump-dom)
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map((i) => {
    const r = i.getBoundingClientRect();
    return {src: i.getAttribute("src"), natural: [i.naturalWidth, i.naturalHeight],
            box: [r.left + scrollX, r.top + scrollY, r.width, r.height]};
  });
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({images, height: document.documentElement.scrollHeight});
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium not installed")
def test_the_report_renders_in_headless_chromium(tmp_path):
    out = tmp_path / "r"
    index = write_report(load_experiment(str(ablation(tmp_path / "abl", proxy=True))), out)
    probe = out / "probe.html"
    probe.write_text(index.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium("--window-size=1200,900", "--dump-dom", probe.as_uri()).stdout
    found = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom)[1]))
    images = {i["src"]: i for i in found["images"]}
    assert list(images) == EVERY_FIGURE
    for src, image in images.items():  # Chromium loaded and decoded every figure
        assert image["natural"][0] > 100, src
    height = int(found["height"])
    assert height > 3000  # twelve figures, one under another
    shot = tmp_path / "shot.png"
    _chromium(f"--window-size=1200,{height}", f"--screenshot={shot}", index.as_uri())
    picture = matplotlib.image.imread(shot)[..., :3]
    assert picture.shape[:2] == (height, 1200)
    # the figures were drawn: many distinct colours, not a blank or text-only page
    colours = np.unique((picture * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 500
    # and the score-against-accuracy scatter is on the screen where the page put it, pixel
    # for pixel (inside its 1-pixel border; up to a pixel of rounding either way)
    scatter = matplotlib.image.imread(out / "score_vs_accuracy.png")[..., :3]
    h, w = scatter.shape[:2]
    x, y, box_w, box_h = images["score_vs_accuracy.png"]["box"]
    assert (box_w, box_h) == (w + 2, h + 2)  # shown at its own size
    error = min(
        np.abs(picture[top : top + h, left : left + w] - scatter).mean()
        for top in range(round(y), round(y) + 3)
        for left in range(round(x), round(x) + 3)
    )
    assert error < 0.01
