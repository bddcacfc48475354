import pytest
import torch
import torchvision.transforms.v2.functional as TF

from maenas_ray.config import DataConfig
from maenas_ray.data import (
    DATASETS,
    DeviceBatches,
    WorkerBatches,
    build_dataset,
    make_synthetic,
    normalize,
    random_crop_flip,
    search_data,
)


def test_registry():
    assert set(DATASETS) == {"synthetic", "cifar10", "cifar100", "imagefolder"}


def test_synthetic_is_deterministic_labelled_and_structured():
    a = make_synthetic(200, 16, 5, seed=3)
    b = make_synthetic(200, 16, 5, seed=3)
    c = make_synthetic(200, 16, 5, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (200, 3, 16, 16) and a.images.dtype == torch.uint8
    assert set(a.labels.tolist()) == set(range(5)) and a.num_classes == 5
    # structure, not noise: neighbouring pixels are strongly correlated
    x = a.images.float()
    dx = (x[..., 1:] - x[..., :-1]).abs().mean()
    shuffled = x.flatten(2)[..., torch.randperm(256)].view_as(x)
    assert dx < 0.5 * (shuffled[..., 1:] - shuffled[..., :-1]).abs().mean()
    # class identity is visible: mean colour differs between classes
    means = torch.stack([x[a.labels == k].mean(dim=(0, 2, 3)) for k in range(5)])
    assert torch.cdist(means, means).max() > 20


def test_synthetic_stats_normalise_to_zero_mean_unit_std():
    d = make_synthetic(300, 16, 10, seed=0)
    x = normalize(d.images, torch.tensor(d.mean), torch.tensor(d.std))
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2


def test_synthetic_test_split_differs_from_train():
    cfg = DataConfig(num_images=100, image_size=16)
    train, test = build_dataset(cfg, True), build_dataset(cfg, False)
    assert len(train) == 100 and len(test) == 20
    assert not torch.equal(train.images[:20], test.images)


def test_random_crop_flip_matches_pad_crop_and_flip():
    x = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    out = random_crop_flip(x, 2, gen)
    gen.set_state(state)
    offsets = torch.randint(0, 5, (2, 6), generator=gen)
    flips = torch.rand(6, generator=gen) < 0.5
    padded = TF.pad(x, [2, 2, 2, 2])
    for i in range(6):
        oy, ox = offsets[:, i].tolist()
        expected = padded[i, :, oy : oy + 8, ox : ox + 8]
        if flips[i]:
            expected = expected.flip(-1)
        assert torch.equal(out[i], expected)


def test_device_batches_shuffle_without_replacement():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 4, 4).contiguous()
    batches = DeviceBatches(
        images, torch.zeros(3), torch.ones(3) / 255, 3, augment=False,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    seen = torch.cat([b[:, 0, 0, 0] for b in batches])
    assert len(batches) == 3 and seen.shape == (9,)
    assert len(set(seen.tolist())) == 9  # no image twice in an epoch


def test_search_data_splits_disjoint_halves():
    cfg = DataConfig(num_images=64, image_size=16)
    data = search_data(cfg, 8, torch.device("cpu"), torch.Generator().manual_seed(0), 16)
    assert data.loader == "device"
    assert len(data.w) == 4 and len(data.a) == 4
    w, a = data.w.images, data.a.images
    assert w.shape[0] == a.shape[0] == 32
    w_rows = {tuple(img.flatten().tolist()) for img in w}
    assert not any(tuple(img.flatten().tolist()) in w_rows for img in a)
    # all 12 images of the synthetic test split (num_images // 5), fewer than the 16 asked
    assert data.eval_images.shape == (12, 3, 16, 16) and data.eval_images.dtype == torch.float32
    assert next(iter(data.w)).shape == (8, 3, 16, 16)


def test_the_eval_images_are_held_out_of_the_w_and_a_splits():
    # a dataset with a test split: the evaluation images are its first ones
    cfg = DataConfig(num_images=64, image_size=16)
    data = search_data(cfg, 8, torch.device("cpu"), torch.Generator().manual_seed(0), 10)
    train, test = build_dataset(cfg, True), build_dataset(cfg, False)
    assert data.eval_split == "test" and data.eval_indices == list(range(10))
    assert not set(data.w_indices) & set(data.a_indices)
    assert sorted(data.w_indices + data.a_indices) == list(range(64))
    mean, std = torch.tensor(train.mean), torch.tensor(train.std)  # the training statistics
    assert torch.equal(data.eval_images, normalize(test.images[:10], mean, std))
    # a dataset without one (given directly, or an ImageFolder without val/): training
    # images that neither split holds
    given = search_data(
        cfg, 8, torch.device("cpu"), torch.Generator().manual_seed(0), 10, dataset=train
    )
    w, a, e = (set(i) for i in (given.w_indices, given.a_indices, given.eval_indices))
    assert given.eval_split == "train" and len(e) == 10
    assert not (w & a) and not (w & e) and not (a & e) and len(w | a | e) == 64
    want = normalize(train.images[given.eval_indices], mean, std)
    assert torch.equal(given.eval_images, want)
    # and the batches each split yields hold only its own images
    rows = {tuple(img.flatten().tolist()): i for i, img in enumerate(train.images)}
    for batches, allowed in ((given.w, w), (given.a, a)):
        assert {rows[tuple(img.flatten().tolist())] for img in batches.images} == allowed


def test_imagefolder_without_val_holds_out_training_images(tmp_path):
    _write_folder(tmp_path, per_class=6)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, num_workers=0)
    data = search_data(cfg, 2, torch.device("cpu"), torch.Generator().manual_seed(0), 4)
    assert data.eval_split == "train" and data.eval_images.shape == (4, 3, 16, 16)
    assert not set(data.eval_indices) & set(data.w_indices + data.a_indices)


def test_worker_path_gives_the_same_kind_of_batches():
    cfg = DataConfig(num_images=64, image_size=16, loader="workers", num_workers=0)
    data = search_data(cfg, 8, torch.device("cpu"), torch.Generator().manual_seed(0), 16)
    assert data.loader == "workers" and isinstance(data.w, WorkerBatches)
    x = next(iter(data.w))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32
    ref = search_data(
        DataConfig(num_images=64, image_size=16), 8, torch.device("cpu"), torch.Generator(), 16
    )
    assert torch.allclose(data.eval_images, ref.eval_images, atol=1e-5)


def test_split_smaller_than_batch_is_a_clear_error():
    cfg = DataConfig(num_images=20, image_size=16)
    with pytest.raises(
        ValueError, match=r"the W-split has 10 images .* fewer than search.batch_size=16"
    ):
        search_data(cfg, 16, torch.device("cpu"), torch.Generator(), 8)


def _write_folder(root, classes=2, per_class=4, size=20):
    from PIL import Image

    for k in range(classes):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(per_class):
            color = (40 * k + 10 * i, 100, 200 - 30 * k)
            Image.new("RGB", (size + i, size), color).save(root / f"class{k}" / f"{i}.png")


def test_imagefolder_through_worker_batches(tmp_path):
    _write_folder(tmp_path / "train")
    _write_folder(tmp_path / "val", per_class=2)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, num_workers=0)
    ds = build_dataset(cfg, train=True)
    assert len(ds) == 8 and ds.num_classes == 2 and ds.images is None
    assert len(build_dataset(cfg, train=False)) == 4
    data = search_data(cfg, 2, torch.device("cpu"), torch.Generator().manual_seed(0), 4)
    assert data.loader == "workers"
    assert next(iter(data.a)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"data\.loader = 'device' needs an in-memory dataset"):
        search_data(
            DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, loader="device"),
            2, torch.device("cpu"), torch.Generator(), 4,
        )  # fmt: skip


def test_imagefolder_without_val_split(tmp_path):
    _write_folder(tmp_path)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16)
    assert len(build_dataset(cfg, train=True)) == 8
    with pytest.raises(FileNotFoundError, match="no held-out split"):
        build_dataset(cfg, train=False)


def test_cifar_absent_without_download_names_the_root(tmp_path):
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match=r"cifar10 is not under data.root='.*'"):
        build_dataset(cfg)


def test_imagenet_retraining_adds_darts_colour_jitter(tmp_path):
    from torchvision.transforms import v2

    from maenas_ray.data.labelled import retrain_data
    from maenas_ray.data.loaders import image_transforms

    _write_folder(tmp_path / "train")
    _write_folder(tmp_path / "val", per_class=2)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, num_workers=0)
    folder = build_dataset(cfg, train=True)

    def jitters(transform) -> list:
        return [t for t in transform.transforms if isinstance(t, v2.ColorJitter)]

    assert jitters(image_transforms(folder, 16, augment=True)) == []  # the search: none
    data = retrain_data(cfg, 2, torch.device("cpu"), torch.Generator().manual_seed(0))
    (jitter,) = jitters(data.train.loader.dataset.transform)
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.6, 1.4)
    assert jitter.hue == (-0.2, 0.2)
    held_out = data.held_out.loader.dataset.transform
    assert jitters(held_out) == []  # evaluation images are not jittered
