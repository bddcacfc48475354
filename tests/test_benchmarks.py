"""The prepared benchmarks run end to end (at tiny sizes on the CPU), so they cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

from test_sweep import installed_env

ROOT = Path(__file__).resolve().parent.parent


def test_the_device_check_smoke_run_writes_its_json_and_summary(tmp_path):
    out = tmp_path / "check"
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--smoke", str(out)],
        capture_output=True, text=True, timeout=480, env=installed_env(),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = json.loads((out / "device_check.json").read_text())
    steps = figures["search_step"]
    # the smoke run: one of each K and precision (the device run pairs every one)
    assert [(r["partial_channels"], r["precision"]) for r in steps] == [(1, "fp32"), (4, "bf16")]
    assert all(r["images_per_s"] > 0 and r["projected_50_epoch_hours"] > 0 for r in steps)
    search = figures["paper_search"]
    assert [e["epoch"] for e in search["epochs"]] == [1, 2]
    assert all(isinstance(e["hessian_eigenvalue"], float) for e in search["epochs"])
    assert search["second_order_precision_ok"] and search["eigenvalue_converged"]
    assert all(r["trials_per_hour"] > 0 for r in figures["sweep"].values())
    summary = (out / "device_check.md").read_text()
    assert "## Search iteration" in summary and "trials/hour" in summary


def test_the_alpha_precision_benchmark_compares_bf16_with_fp32(tmp_path):
    out = tmp_path / "figures.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "alpha_precision.py"), "--channels", "4",
         "--layers", "3", "--image-size", "16", "--batch", "8", "--hessian-iters", "4",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    figures = json.loads(out.read_text())
    assert 0.9 < figures["first_order_bf16_vs_fp32"]["cosine"] <= 1.0
    assert figures["hessian"]["hessian_vector_product_s"] > 0
    assert 0 < figures["hessian"]["share_of_cifar10_epoch"] < 1
    assert run.stdout.strip().splitlines()[-1].startswith("hessian share of a CIFAR-10 epoch: ")


def test_the_ablation_table_reads_a_sweep_into_docs_ablation_rows(tmp_path):
    from test_report import TRIALS, ablation

    experiment = ablation(tmp_path / "abl", proxy=True)
    run = subprocess.run(
        ["python", str(ROOT / "benchmarks" / "ablation_table.py"), str(experiment)],
        capture_output=True, text=True, timeout=120, env=installed_env(), check=True,
    )  # fmt: skip
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith("| decoder | mask ratio | final skips | skips per epoch |")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:6]]
    # one row per trial, by decoder then mask ratio, with its final skip count
    by_key = {(t[1], t[2]): t[4] for t in TRIALS}
    assert [(c[0], float(c[1])) for c in cells] == sorted(by_key)
    assert [int(c[2]) for c in cells] == [by_key[(c[0], float(c[1]))] for c in cells]
    assert lines[-1].startswith("Kendall τ(−eval_loss, proxy_top1) = 0.333")
