import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import maenas_ray.config
from maenas_ray.config import (
    Config,
    ConfigError,
    config_from_dict,
    flatten,
    load_config,
    merge,
    resolve_defaults,
)
from maenas_ray.engines import check_registered, objective_mode
from maenas_ray.sweep_space import check_sweep, load_sweep, name_problem


def test_defaults_are_the_design_numbers():
    cfg = load_config()
    s = cfg.search
    assert (s.channels, s.layers, s.epochs, s.batch_size) == (16, 8, 50, 64)
    assert (s.lr, s.lr_min, s.momentum, s.weight_decay, s.grad_clip) == (
        0.025, 0.001, 0.9, 3e-4, 5.0,
    )  # fmt: skip
    assert (s.arch_lr, s.arch_betas, s.arch_weight_decay) == (3e-4, (0.5, 0.999), 1e-3)
    assert cfg.data.train_portion == 0.5 and s.unrolled is False and s.decoder == "hierarchical"


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"search": {"mask_ratio": 0.3, "arch_betas": [0.6, 0.9]}}))
    cfg = load_config(path, ["search.patch_size=8", "data.dataset=cifar10", "search.unrolled=true"])
    assert cfg.search.mask_ratio == 0.3 and cfg.search.arch_betas == (0.6, 0.9)
    assert cfg.search.patch_size == 8 and cfg.search.unrolled is True
    assert cfg.data.dataset == "cifar10"
    assert config_from_dict(cfg.to_dict()) == cfg  # round trip through plain data


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["search.mask_ratio=1.5"], r"search.mask_ratio = 1.5: must be in \(0, 1\)"),
        (["search.mask_ratio=0"], r"search.mask_ratio = 0.0: must be in \(0, 1\)"),
        (["search.patch_size=5"], r"search.patch_size = 5: must divide data.image_size \(32\)"),
        (["search.decoder_depth=0"], r"search.decoder_depth = 0: must be >= 1"),
        (["data.dataset=mnist"], r"data.dataset = 'mnist': allowed: synthetic, cifar10, cifar100"),
        (["search.decoder=unet"], r"search.decoder = 'unet': allowed: hierarchical, plain"),
        (["search.mask_rate=0.5"], r"unknown key 'search.mask_rate'; allowed keys here: channels"),
        (["serach.mask_ratio=0.5"], r"unknown key 'serach'; allowed keys here: data, search"),
        (["search.epochs=ten"], r"search.epochs = 'ten': expected an integer"),
        (["search.epochs=-3"], r"search.epochs = -3: must be a positive integer"),
        (["search.epochs=2.5"], r"search.epochs = 2.5: expected an integer"),
        (["search.unrolled=1"], r"search.unrolled = 1: expected true or false"),
        (["search.device=tpu"], r"search.device = 'tpu': expected one of 'auto', 'cpu', 'cuda'"),
        (["search.arch_betas=[0.5]"], r"search.arch_betas = \[0.5\]: expected a list of 2"),
        (["search.patch_size=32"], r"search.mask_ratio = 0.5: masks 0 of the 1 patches"),
        (["search.eval_mask_ratio=0.99", "search.patch_size=16"],
         r"search.eval_mask_ratio = 0.99: masks 4 of the 4 patches"),
        (["data.train_portion=1"], r"data.train_portion = 1.0: must be in \(0, 1\)"),
        (["data.dataset=cifar10", "data.image_size=64"], r"data.image_size = 64: cifar10 images"),
        (["search.stem=imagenet", "data.image_size=48"],
         r"data.image_size = 48: must be a multiple of 32 for stem 'imagenet'"),
        (["search.lr_min=0.1"], r"search.lr_min = 0.1: must be <= search.lr"),
        (["search.channels=4", "search.partial_channels=3"],
         r"search.partial_channels = 3: must divide the channels of every cell \(4, 8, 16\); "
         r"allowed: 1, 2, 4$"),
        (["search.partial_channels=0"], r"search.partial_channels = 0: must divide the channels"),
        (["search=3"], r"search = 3: expected a mapping"),
        (["search.mask_ratio"], r"--set 'search.mask_ratio': expected key=value"),
    ],
)  # fmt: skip
def test_config_errors_name_key_value_and_allowed(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_registered(load_config(None, overrides))  # as the command lines check


def test_imagefolder_needs_an_existing_root(tmp_path):
    with pytest.raises(ConfigError, match=r"data.root = '.*nope': imagefolder needs an existing"):
        load_config(None, ["data.dataset=imagefolder", f"data.root={tmp_path / 'nope'}"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    top = tmp_path / "top.yaml"
    top.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(top)


def test_config_is_a_typed_tree():
    cfg = Config()
    assert cfg.to_dict()["search"]["arch_betas"] == [0.5, 0.999]


def test_the_objective_direction_follows_its_metric():
    from maenas_ray.sweep import QUICKSTART

    quick = load_sweep(QUICKSTART)
    assert objective_mode(quick.objective) == "max"  # proxy_top1
    loss = load_sweep(QUICKSTART, ["objective.metric=eval_loss"])
    assert objective_mode(loss.objective) == "min"  # not the quickstart's accuracy direction
    assert objective_mode(load_config(None, ["objective.metric=eval_psnr"]).objective) == "max"
    agreeing = load_config(None, ["objective.metric=eval_loss", "objective.mode=min"])
    assert objective_mode(agreeing.objective) == "min"
    with pytest.raises(ConfigError, match=r"objective.mode = 'max': objective.metric = "):
        check_registered(load_config(None, ["objective.metric=val_loss", "objective.mode=max"]))
    with pytest.raises(ConfigError, match=r"objective.metric = 'accuracy': allowed: eval_loss"):
        load_sweep(None, ["objective.metric=accuracy"])  # a sweep checks the names too


def test_exponent_floats_without_a_dot_are_numbers():
    # YAML 1.1 reads 1e-3 as a string; a float key takes it as the number it means
    cfg = load_config(None, ["search.lr=1e-3", "search.arch_lr=5E-4", "search.lr_min=0"])
    assert cfg.search.lr == 0.001 and cfg.search.arch_lr == 0.0005
    with pytest.raises(ConfigError, match=r"search.lr = 'fast': expected a number"):
        load_config(None, ["search.lr=fast"])


def test_partial_channels_are_tunable_and_the_corner_points_are_checked():
    cfg = load_config(None, ["space={partial_channels: {choice: [1, 4]}}"])
    check_sweep(cfg)
    assert cfg.search.partial_channels == 1
    bad = load_config(None, ["search.channels=12", "space={partial_channels: {choice: [1, 8]}}"])
    with pytest.raises(
        ConfigError,
        match=r"space: the trial point partial_channels=8 is invalid: search.partial_channels = 8: "
        r"must divide the channels of every cell \(12, 24, 48\); allowed: 1, 2, 3, 4, 6, 12",
    ):
        check_sweep(bad)


def test_the_evaluation_masks_are_resolved_at_load_and_saved_configs_compare():
    cfg = load_config(None, ["search.mask_ratio=0.6", "search.patch_size=8"])
    assert (cfg.search.eval_mask_ratio, cfg.search.eval_patch_size) == (0.6, 8)
    assert Config().search.eval_patch_size == Config().search.patch_size == 4
    own = load_config(None, ["search.eval_mask_ratio=0.4", "search.mask_ratio=0.6"])
    assert (own.search.eval_mask_ratio, own.search.eval_patch_size) == (0.4, 4)
    # a config saved before they were resolved at load (a checkpoint's) holds nulls
    old = merge(cfg.to_dict(), {"search": {"eval_mask_ratio": None, "eval_patch_size": None}})
    assert config_from_dict(old) == cfg
    assert resolve_defaults(old) == cfg.to_dict() and old["search"]["eval_patch_size"] is None
    assert resolve_defaults(own.to_dict()) == own.to_dict()


def test_nested_dict_helpers():
    base = {"search": {"lr": 0.1, "epochs": 2}, "name": "a"}
    merged = merge(base, {"search": {"lr": 0.2}, "tune": {"seed": 1}})
    assert merged == {"search": {"lr": 0.2, "epochs": 2}, "name": "a", "tune": {"seed": 1}}
    assert base["search"]["lr"] == 0.1  # not modified
    assert flatten(merged) == {"search.lr": 0.2, "search.epochs": 2, "name": "a", "tune.seed": 1}
    assert flatten({"mask_ratio": 0.5}, "param.") == {"param.mask_ratio": 0.5}


def test_experiment_and_run_names():
    assert name_problem("quickstart-2026.01_a") is None
    assert name_problem("-x") == name_problem("a/b") == "letters, digits, '.', '_' and '-' only"
    assert name_problem("n" * 201) == "at most 200 characters"
    with pytest.raises(ConfigError, match=r"name = 'a b': letters, .* \(a directory name\)"):
        load_sweep(None, ["name=a b"])


def test_the_config_module_imports_no_layer_above_it():
    # in a fresh interpreter: the imports of this test process would hide one
    code = (
        "import sys, maenas_ray.config\n"
        "above = ('maenas_ray.data', 'maenas_ray.engines', 'maenas_ray.orchestration',\n"
        "         'maenas_ray.search', 'maenas_ray.retrain', 'maenas_ray.sweep')\n"
        "print([m for m in sys.modules if m.startswith(above)])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
    # nor inside a function (the imports it may have: the space and mae layers below it)
    tree = ast.parse(Path(maenas_ray.config.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m for m in imported if m.startswith("maenas_ray")} <= {
        "maenas_ray.mae", "maenas_ray.space", "maenas_ray.space.networks",
        "maenas_ray.space.partial",
    }  # fmt: skip


def test_a_retrain_is_not_refused_for_the_search_splits_and_is_for_its_own_batch():
    cfg = config_from_dict({"data": {"num_images": 100}, "retrain": {"batch_size": 8}})
    cfg.check_retrain()  # the search's W-split (50 images) holds no search batch (64)
    with pytest.raises(ConfigError, match=r"data.num_images = 100: the W-split would hold 50"):
        cfg.check_search_splits()
    small = config_from_dict({"data": {"num_images": 100}, "retrain": {"batch_size": 128}})
    with pytest.raises(ConfigError, match=r"the retrain would train on 100 images, fewer than"):
        small.check_retrain()
