import json
import re
import subprocess
import sys

import yaml

from maenas_ray.search import main
from maenas_ray.space import Genotype

TINY = {
    "data": {"num_images": 64, "image_size": 16},
    "search": {
        "channels": 4, "layers": 3, "batch_size": 8, "epochs": 2, "steps_per_epoch": 2,
        "patch_size": 4, "eval_images": 8, "decoder_width": 8, "device": "cpu", "hessian_iters": 2,
    },
}  # fmt: skip


def _config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_cli_runs_a_search_and_writes_everything(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["--config", str(_config(tmp_path)), "--out", str(out), "--set", "search.seed=3"]) == 0
    )
    printed = capsys.readouterr().out
    assert "epoch 1/2" in printed and "epoch 2/2" in printed and "genotype: Genotype(" in printed
    assert re.search(r"epoch 2/2 .* H\(α\) 2\.0\d\d  λ -?\d", printed)  # the eigenvalue
    # 4 α steps at the paper's rate leave α uniform: the run says its genotype means little
    assert re.search(
        r"warning: α ended close to uniform \(mean entropy 2\.0\d\d; uniform is ln 8 = "
        r"2\.079\): the genotype carries little information. .*raise search.arch_lr",
        printed,
    )
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    Genotype.from_json((out / "genotype.json").read_text())
    assert yaml.safe_load((out / "config.yaml").read_text())["search"]["seed"] == 3
    assert (out / "checkpoint" / "search_state.pt").is_file()
    for name in ("reconstruction.png", "alphas.png", "cells.png"):
        assert (out / name).stat().st_size > 1000

    # the same --out again is refused rather than overwritten
    assert main(["--config", str(_config(tmp_path)), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err

    # --resume takes the stored config; a finished run stays finished, history not duplicated
    assert main(["--out", str(out), "--resume"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]

    # resuming with a config that changes the search is refused, naming the change
    assert main(["--out", str(out), "--resume", "--set", "search.mask_ratio=0.25"]) == 2
    assert "search.mask_ratio: 0.5 -> 0.25" in capsys.readouterr().err


def test_cli_config_errors_exit_2_with_the_key(tmp_path, capsys):
    code = main(["--config", str(_config(tmp_path)), "--out", str(tmp_path / "x"),
                 "--set", "search.patch_size=5"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "search.patch_size = 5: must divide data.image_size (16)" in err
    assert not (tmp_path / "x").exists()  # nothing half-created
    assert main(["--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_module_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "maenas_ray.search", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--resume" in done.stdout
