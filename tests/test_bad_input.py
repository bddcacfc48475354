"""Bad input, one table: every command line refuses it with one line that names the key,
the value and what is allowed, exits with 2, and leaves nothing behind on the storage."""

import json
import re
import time

import pytest
import ray

from maenas_ray.genotypes import main as genotypes_main
from maenas_ray.report import main as report_main
from maenas_ray.retrain import main as retrain_main
from maenas_ray.search import main as search_main
from maenas_ray.space import PUBLISHED
from maenas_ray.sweep import main as sweep_main

CLIS = {
    "sweep": sweep_main, "search": search_main, "retrain": retrain_main,
    "genotypes": genotypes_main, "report": report_main,
}  # fmt: skip
V2 = json.loads(PUBLISHED["DARTS_V2"].to_json())

# (command, arguments, expected error); {tmp} is the test's directory, {store} the storage
# path given to sweep and retrain
CASES = [
    ("sweep", ["--set", "search.epochs=abc"], r"search.epochs = 'abc': expected an integer"),
    ("sweep", ["--set", "search.epochs=-1"], r"search.epochs = -1: must be a positive integer"),
    ("sweep", ["--set", "search.lr=fast"], r"search.lr = 'fast': expected a number"),
    ("sweep", ["--set", "search.mask_ratio=1.5"], r"search.mask_ratio = 1.5: must be in \(0, 1\)"),
    ("sweep", ["--set", "search.patch_size=5"],
     r"search.patch_size = 5: must divide data.image_size \(16\); divisors: \[1, 2, 4, 8, 16\]"),
    ("sweep", ["--set", "data.dataset=imagenet21k"],
     r"data.dataset = 'imagenet21k': allowed: synthetic, cifar10, cifar100, imagefolder"),
    ("sweep", ["--set", "search.decoder=transformer"],
     r"search.decoder = 'transformer': allowed: hierarchical, plain"),
    ("sweep", ["--set", "data.dataset=imagefolder", "--set", "data.root={tmp}/no-images"],
     r"data.root = '.*/no-images': imagefolder needs an existing directory of class folders"),
    ("sweep", ["--set", "search.device=tpu"],
     r"search.device = 'tpu': expected one of 'auto', 'cpu', 'cuda'"),
    ("sweep", ["--set", "search.mask_rate=0.5"],
     r"unknown key 'search.mask_rate'; allowed keys here: channels, .*mask_ratio"),
    ("sweep", ["--set", "tune.num_samples=0"], r"tune.num_samples = 0: must be a positive"),
    ("sweep", ["--set", "search.lr=.inf"], r"search.lr = inf: expected a finite number"),
    ("sweep", ["--set", "data.num_images=1"],
     r"data.num_images = 1: the W-split would hold 0 images \(data.train_portion 0.5\), fewer "
     r"than search.batch_size \(32\)"),
    ("sweep", ["--set", "retrain.batch_size=5000"],
     r"data.num_images = 5120: the proxy retrain would train on 4608 images, fewer than "
     r"retrain.batch_size \(5000\)"),
    ("sweep", ["--name", "n" * 300], r"name = 'nnnn.*': at most 200 characters"),
    ("sweep", ["--config", "{tmp}/binary.yaml"],
     r"config file '.*/binary.yaml' is not a text \(UTF-8\) file"),
    ("sweep", ["--num-cpus", "0"], r"--num-cpus 0: must be >= 1"),
    ("sweep", ["--num-cpus", "-1"], r"--num-cpus -1: must be >= 1"),
    ("sweep", ["--address", "127.0.0.1:1"],
     r"cannot reach the Ray cluster at --address 127.0.0.1:1: Connection refused"),
    ("retrain", ["--genotype", "DARTS_V2", "--address", "127.0.0.1:1"],
     r"cannot reach the Ray cluster at --address 127.0.0.1:1: Connection refused"),
    ("search", ["--out", "{tmp}/a-file"], r"--out '.*/a-file': '.*/a-file' is a file, not a dir"),
    ("search", ["--out", "{tmp}/a-file/sub"],
     r"--out '.*/a-file/sub': '.*/a-file' is a file, not a directory"),
    ("sweep", ["--set", "search.arch_lr=.nan"], r"search.arch_lr = nan: expected a finite"),
    ("sweep", ["--set", "search.mask_rato=0.5"],
     r"unknown key 'search.mask_rato'; allowed keys here: .*; did you mean 'mask_ratio'\?"),
    ("search", ["--out", "{tmp}/run", "--set", "search.decoder=hierarchcal"],
     r"search.decoder = 'hierarchcal': allowed: hierarchical, plain; did you mean "
     r"'hierarchical'\?"),
    ("search", ["--out", "{tmp}/run", "--set", "search.precision=bf61"],
     r"search.precision = 'bf61': expected one of 'auto', 'fp32', 'bf16'; did you mean 'bf16'"),
    ("sweep", ["--set", "objective.metric=eval_loss", "--set", "objective.mode=max"],
     r"objective.mode = 'max': objective.metric = 'eval_loss' is optimised with mode 'min'; "
     r"drop objective.mode \(it follows the metric\) or set it to 'min'"),
    ("sweep", ["--set", "objective.metric=accuracy"],
     r"objective.metric = 'accuracy': allowed: eval_loss, .*proxy_top1"),
    ("sweep", ["--set", "space.mask_ratio.high=1.5"],
     r"space: the trial point .*mask_ratio=1.5.* is invalid: search.mask_ratio = 1.5: must be"),
    ("sweep", ["--set", "space.conv_size={{low: 1, high: 2}}"],
     r"space.conv_size: not a search key; tunable keys: channels, "),
    ("sweep", ["--config", "{tmp}/missing.yaml"], r"config file '.*/missing.yaml' does not exist"),
    ("sweep", ["--config", "{tmp}/broken.yaml"],
     r"config file '.*/broken.yaml' is not valid YAML: line 2, column 1: expected ','"),
    ("sweep", ["--storage-path", "{tmp}/a-file/sub"],
     r"storage_path = '.*/a-file/sub': cannot write there \(.*Not a directory"),
    ("sweep", ["--storage-path", "foo://bucket/x"],
     r"storage_path = 'foo://bucket/x': not a usable URI .*; use a directory, s3://"),
    ("sweep", ["--resume", "--name", "nothing"],
     r"--resume: .*/nothing holds no sweep experiment \(sweep_config.yaml\)"),
    ("sweep", ["--set", "tune.gpus_per_trial=1", "--num-cpus", "2", "--no-dashboard"],
     r"tune.gpus_per_trial = 1: the local Ray \(this machine\) has 0 GPUs; set tune.gpus_pe"),
    ("search", ["--out", "{tmp}/run", "--set", "search.hessian_every=-1"],
     r"search.hessian_every = -1: must be >= 0 \(epochs; 0 = off\)"),
    ("sweep", ["--set", "search.early_stop_window=0"],
     r"search.early_stop_window = 0: must be >= 1 \(epochs\)"),
    ("search", ["--out", "{tmp}/run", "--set", "search.early_stop_ratio=1.5"],
     r"search.early_stop_ratio = 1.5: must be in \(0, 1\)"),
    ("search", ["--out", "{tmp}/run", "--set", "search.early_stop_ratio=0"],
     r"search.early_stop_ratio = 0.0: must be in \(0, 1\)"),
    ("search", ["--out", "{tmp}/run", "--set", "search.early_stop=true",
                "--set", "search.hessian_every=0"],
     r"search.early_stop = True: needs the eigenvalue: set search.hessian_every >= 1"),
    ("search", ["--out", "{tmp}/run", "--resume"], r"--resume: no checkpoint at .*/run/checkpoint"),
    ("search", ["--out", "{tmp}/run", "--set", "search.batch_size=0"],
     r"search.batch_size = 0: must be a positive integer"),
    ("retrain", ["--genotype", "{tmp}/truncated.json"],
     r"--genotype '.*/truncated.json': genotype JSON is malformed: .*line 1 column"),
    ("retrain", ["--genotype", "{tmp}/unknown-op.json"],
     r"--genotype '.*/unknown-op.json': .*'conv_9x9'.*sep_conv_3x3"),
    ("retrain", ["--genotype", "NOT_A_NAME"],
     r"--genotype 'NOT_A_NAME': neither a file nor a published genotype \(DARTS_V1, "),
    ("retrain", ["--genotype", "DARTS_V2", "--set", "retrain.epochs=-3"],
     r"retrain.epochs = -3: must be a positive integer"),
    ("retrain", ["--experiment", "{tmp}/nothing"], r"'.*/nothing' is not a directory"),
    # checked before Ray starts: the GPUs asked for, the network against the image size
    ("retrain", ["--genotype", "DARTS_V2", "--use-gpu", "--num-workers", "32"],
     r"retrain.use_gpu = true needs 32 GPU\(s\), one per worker \(retrain.num_workers = 32\); "
     r"this machine has \d+: leave out --use-gpu"),
    ("retrain", ["--genotype", "DARTS_V2", "--set", "data.image_size=16"],
     r"retrain.auxiliary = True: the retrain network at data.image_size 16: .*auxiliary head "
     r"needs a larger input .*; set retrain.auxiliary: false"),
    ("retrain", ["--genotype", "DARTS_V2", "--config", "tune_configs/retrain_quick.yaml",
                 "--set", "retrain.batch_size=6000"],
     r"data.num_images = 5120: the retrain would train on 5120 images, fewer than "
     r"retrain.batch_size \(6000\)"),
    ("search", ["--out", "{tmp}/run", "--set", "data.num_images=40"],
     r"data.num_images = 40: the W-split would hold 20 images"),
    ("retrain", ["--genotype", "DARTS_V2", "--num-workers", "5"],
     r"retrain.batch_size = 96: must be divisible by retrain.num_workers \(5\)"),
    ("genotypes", ["{tmp}/nothing"], r"'.*/nothing' is not a directory \(expected a sweep"),
    ("report", ["{tmp}", "--top", "0"], r"--top 0: must be >= 1"),
]  # fmt: skip


def _ids(case):
    return f"{case[0]}:{' '.join(case[1])}"[:60]


@pytest.mark.parametrize(("cli", "args", "message"), CASES, ids=[_ids(c) for c in CASES])
def test_bad_input_gives_one_clear_line_and_leaves_nothing(tmp_path, capsys, cli, args, message):
    (tmp_path / "broken.yaml").write_text("search: [epochs\n")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "truncated.json").write_text(json.dumps(V2)[:40])
    bad_op = {**V2, "normal": [["conv_9x9", 0], *V2["normal"][1:]]}
    (tmp_path / "unknown-op.json").write_text(json.dumps(bad_op))
    before = sorted(p.name for p in tmp_path.iterdir())
    store = tmp_path / "store"
    argv = [a.format(tmp=tmp_path) for a in args]
    if cli in ("sweep", "retrain") and "--storage-path" not in argv:
        argv += ["--storage-path", str(store)]
    start = time.monotonic()
    rc = CLIS[cli](argv)
    assert time.monotonic() - start < 60
    err = capsys.readouterr().err
    assert rc == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip() == errors[0], err  # one line, nothing else
    assert re.search(message, errors[0]), errors[0]
    # nothing half-created: no experiment or run directory, no output directory
    assert not store.exists() or list(store.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "store") == before
    assert not ray.is_initialized()


def test_an_address_where_no_ray_answers_is_refused_in_bounded_time(tmp_path, capsys, monkeypatch):
    """A host:port that accepts connections but is no Ray cluster (Ray would retry for
    ever): one line, exit 2, within twice the connect timeout."""
    import contextlib
    import socket
    import threading

    from maenas_ray import cli

    monkeypatch.setattr(cli, "CONNECT_TIMEOUT_S", 3.0)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted, stop = [], threading.Event()

    def accept() -> None:  # take connections and say nothing, as a wrong service would
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        rc = sweep_main(["--address", f"127.0.0.1:{port}", "--storage-path", str(tmp_path / "s")])
        took = time.monotonic() - start
    finally:
        stop.set()
        thread.join()
        server.close()
    err = capsys.readouterr().err
    assert rc == 2 and took < 20, (rc, took, err)
    assert err.strip() == (
        f"error: cannot reach the Ray cluster at --address 127.0.0.1:{port}: it accepts "
        "connections, but no Ray GCS answers there"
    )
    assert accepted and not ray.is_initialized()
    assert not (tmp_path / "s").exists() or list((tmp_path / "s").iterdir()) == []
