"""Reading experiments without Ray (``maenas_ray.results``, ``python -m maenas_ray.genotypes``).

The real experiments come from the sweep integration tests (tests/test_sweep.py,
tests/test_retrain.py), which also check these readers against Ray Tune's ResultGrid;
here the edge cases: a running trial, an errored one, an empty experiment, bad input.
"""

import json
import os

import pyarrow.fs
import pyarrow.parquet as pq
import pytest
import yaml

from maenas_ray.config import load_config
from maenas_ray.genotypes import main
from maenas_ray.results import ExperimentError, load_experiment
from maenas_ray.space import PUBLISHED


def make_experiment(root, trials):
    """An experiment directory as the sweep writes it: config, then trial directories."""
    root.mkdir(parents=True)
    cfg = load_config(None, ["objective.metric=eval_loss", "search.epochs=2"])
    (root / "sweep_config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    for trial_id, rows, extra in trials:
        d = root / f"trial_{trial_id}"
        d.mkdir()
        (d / "params.json").write_text(json.dumps({"search": {"mask_ratio": 0.5}}))
        (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)
    return root


GENOTYPE = PUBLISHED["DARTS_V2"].to_json()


def rows(losses):
    return [{"epoch": i + 1, "eval_loss": v, "genotype": GENOTYPE} for i, v in enumerate(losses)]


def test_running_errored_and_done_trials_are_read_as_they_are(tmp_path):
    root = make_experiment(tmp_path / "e", [
        ("done", rows([0.9, 0.5]), ""),
        ("running", rows([0.4]), '{"epoch": 2, "eval_lo'),  # a line still being written
        ("broken", rows([0.1]), ""),
        ("fresh", [], ""),
    ])  # fmt: skip
    (root / "trial_broken" / "error.txt").write_text("Traceback ...\nFloatingPointError: nan\n")
    # a trial that failed once and was restarted: Tune keeps its error.txt
    (root / "trial_done" / "error.txt").write_text("WorkerGroupError\n")
    os.utime(root / "trial_done" / "error.txt", (1, 1))  # older than its results
    (root / "trial_running" / "error.txt").write_text("WorkerGroupError\n")
    os.utime(root / "trial_running" / "error.txt", (1, 1))  # restarted, reporting again
    exp = load_experiment(str(root))
    status = {t.trial_id: t.status for t in exp.trials()}
    assert status == {
        "done": "done", "running": "unfinished", "broken": "error", "fresh": "unfinished"
    }  # fmt: skip
    assert {t.trial_id: t.error for t in exp.trials()}["broken"] == "FloatingPointError: nan"
    best = exp.best(k=5)
    assert [t.trial_id for _, _, t in best] == ["running", "done"]  # errored never best
    assert best[0][0] == PUBLISHED["DARTS_V2"] and best[0][1] == 0.4
    assert [t.trial_id for _, _, t in exp.best(metric="eval_loss", mode="max", k=2)] == [
        "done", "running"
    ]  # fmt: skip


def test_a_filesystem_like_s3_reads_the_same(tmp_path):
    make_experiment(tmp_path / "bucket" / "sweeps" / "e", [("a", rows([0.3]), "")])
    bucket = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"), pyarrow.fs.LocalFileSystem())
    exp = load_experiment("sweeps/e", filesystem=bucket)
    assert [t.trial_id for t in exp.trials()] == ["a"] and exp.best()[0][1] == 0.3


def test_bad_input_gives_one_line_naming_what_was_expected(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    make_experiment(tmp_path / "empty", [])
    make_experiment(tmp_path / "one", [("a", rows([0.3]), "")])
    cases = [
        ([str(tmp_path / "plain")], "is not a sweep experiment: no sweep_config.yaml"),
        ([str(tmp_path / "nope")], "is not a directory (expected a sweep experiment)"),
        ([str(tmp_path / "empty")], "unknown metric 'eval_loss'; the trials report: none yet"),
        ([str(tmp_path / "empty"), "--format", "parquet", "--out", str(tmp_path / "x.parquet")],
         "has no trials yet"),
        ([str(tmp_path / "one"), "--metric", "accuracy"],
         "unknown metric 'accuracy'; the trials report: epoch, eval_loss"),
        ([str(tmp_path / "one"), "--metric", "epoch"], "has no natural direction"),
        ([str(tmp_path / "one"), "--format", "parquet"], "give --out FILE.parquet"),
        ([str(tmp_path / "one"), "--top", "0"], "--top 0: must be >= 1"),
    ]  # fmt: skip
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    nogeno = make_experiment(tmp_path / "nogeno", [("a", [{"epoch": 1, "eval_loss": 0.3}], "")])
    with pytest.raises(ExperimentError, match=r"no trial of .* has a genotype and a eval_loss"):
        load_experiment(str(nogeno)).best()


def test_formats(tmp_path, capsys):
    root = make_experiment(tmp_path / "e", [("a", rows([0.3]), ""), ("b", rows([0.2]), "")])
    assert main([str(root), "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(json.loads(line) == json.loads(GENOTYPE) for line in lines)
    assert main([str(root), "--format", "python"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# trial b: eval_loss = 0.2\nTOP1 = Genotype(")
    from maenas_ray.space import Genotype  # noqa: F401 - the printed line is Python

    assert eval(out.splitlines()[1].split(" = ", 1)[1]) == PUBLISHED["DARTS_V2"]
    assert main([str(root), "--format", "table"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:7] == [
        "rank",
        "trial",
        "decoder_depth",
        "mask_ratio",
        "patch_size",
        "eval_loss",
        "skips",
    ]  # fmt: skip  (the tuned keys in the order of the saved config)
    assert table[1].split()[:7] == ["1", "b", "-", "0.5", "-", "0.2", "-"]
    assert table[2].split()[:8] == ["2", "a", "-", "0.5", "-", "0.3", "-", "unfinished@1"]
    assert main([str(root), "--format", "parquet", "--out", str(tmp_path / "t.parquet")]) == 0
    data = pq.read_table(tmp_path / "t.parquet").to_pylist()
    assert [r["trial_id"] for r in data] == ["a", "b"]
    assert data[1]["metric.eval_loss"] == 0.2 and data[1]["param.search.mask_ratio"] == 0.5
    assert [r["rank"] for r in data] == [2, 1]  # the objective's order (eval_loss: min)


def test_a_search_stopped_early_on_collapse_is_a_finished_trial():
    from maenas_ray.config import load_config
    from maenas_ray.results import trial_done

    cfg = load_config(None, ["objective.metric=eval_loss", "search.epochs=20"])
    assert not trial_done(cfg, {}, {"epoch": 12})
    assert trial_done(cfg, {}, {"epoch": 12, "stopped_early": True, "kept_epoch": 7})
    assert trial_done(cfg, {"search": {"epochs": 12}}, {"epoch": 12})
    proxy = load_config(None, ["search.epochs=20"])  # proxy_top1: the proxy must run too
    assert not trial_done(proxy, {}, {"epoch": 12, "stopped_early": True})
    stopped_and_scored = {"epoch": 12, "stopped_early": True, "proxy_epoch": 10}
    assert trial_done(proxy, {}, stopped_and_scored)
