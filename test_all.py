"""All tests, CPU-only and offline: math identities, smoke runs of every script, the command line end to end.

Run: python -m pytest -q test_all.py   (a few minutes on 2 cores)
Real data from ../shared/data is used where present; those tests skip cleanly without it.

Sections follow the files: shared helpers and fixtures, data.py, unet.py, ddpm.py, vdm.py, ddgan.py,
shortcut_mcmc.py, trilemma.py, then the run plumbing that every script shares. A test's name starts with its
file or method (test_data_*, test_unet_*, test_ddpm_*, test_vdm_*, test_ddgan_*, test_shortcut_*,
test_trilemma_*, test_plumbing_*), and the plumbing tests name the method in their ids, so that
`pytest -k ddgan test_all.py` selects every DDGAN test.
"""
import argparse
import copy
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
SHARED = os.path.join(HERE, "..", "shared", "data")

import data  # noqa: E402
import ddgan  # noqa: E402
import ddpm  # noqa: E402
import shortcut_mcmc as sm  # noqa: E402
import trilemma  # noqa: E402
import unet  # noqa: E402
import vdm  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


# ====================================================================================================
# Shared helpers and fixtures
def _need_shared(*parts):
    """Path inside ../shared/data, or skip the test when that copy is absent."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    return path


def run_cli(script, *args, cwd=None):
    """Run a script as a user would; returns the CompletedProcess (stdout + stderr captured)."""
    return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def main_exit(main, argv):
    """Run a script's main(argv) in-process (much faster than a subprocess); returns the exit code."""
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory):
    """A few real CIFAR-10 JPEGs (two classes, train and test) extracted from ../shared/data."""
    tarball = os.path.join(SHARED, "cifar10-jpeg.tar.gz")
    if not os.path.exists(tarball):
        pytest.skip("../shared/data/cifar10-jpeg.tar.gz not present")
    root = tmp_path_factory.mktemp("cifar")
    want = {f"{split}/{c}/{i:04d}.jpg" for split in ("train", "test") for c in ("airplane", "automobile")
            for i in range(12)}
    with tarfile.open(tarball) as tf:
        members = [m for m in tf.getmembers() if m.name.lstrip("./") in want]
        tf.extractall(root, members=members, filter="data")
    if not members:
        pytest.skip("unexpected layout of cifar10-jpeg.tar.gz")
    return str(root)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny two-class image folder made here (always available, unlike ../shared/data)."""
    root = tmp_path_factory.mktemp("tiny")
    g = np.random.default_rng(0)
    for cls, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        os.makedirs(root / cls)
        for i in range(8):
            img = np.full((12, 12, 3), colour, np.uint8) + g.integers(0, 30, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / cls / f"{i}.png")
    return str(root)


TINY_UNET = ["--ch", 8, "--ch-mult", 1, 2, "--num-res-blocks", 1, "--image-size", 8, "--batch-size", 8]


# ====================================================================================================
# data.py: data sets, batches, pictures and scores
# ---- glyphs ----------------------------------------------------------------------------------------
def test_data_glyphs_shapes_labels_contrast():
    x, y, names = data.load("glyphs", image_size=16)
    assert x.shape == (30_000, 3, 16, 16) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and names == [str(d) for d in range(10)]
    assert torch.bincount(y, minlength=10).tolist() == [3000] * 10  # balanced, all present
    luma = (x.float() * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1)  # (N, 16, 16)
    spread = luma.flatten(1).max(1).values - luma.flatten(1).min(1).values
    assert spread.min() > 0.25 * 255  # every image has a visible digit on its background
    xt, yt, _ = data.load("glyphs", split="test", image_size=16)
    assert xt.shape == (5_000, 3, 16, 16) and set(yt.tolist()) == set(range(10))
    assert not torch.equal(xt, x[:5_000])


def test_data_glyphs_deterministic_per_seed():
    a = data.load("glyphs", split="test", image_size=8, seed=3)[0]
    data._load.cache_clear()  # force a fresh render, not the cached tensor
    b = data.load("glyphs", split="test", image_size=8, seed=3)[0]
    c = data.load("glyphs", split="test", image_size=8, seed=4)[0]
    assert a is not b and torch.equal(a, b) and not torch.equal(a, c)
    assert data.load("glyphs", split="test", image_size=12)[0].shape == (5_000, 3, 12, 12)


def test_data_glyphs_mono_is_the_same_digits_in_one_channel():
    x, y, _ = data.load("glyphs-mono", "test", 16)
    xc, yc, _ = data.load("glyphs", "test", 16)
    assert x.shape == (5000, 1, 16, 16) and torch.equal(y, yc)
    assert x.flatten(1).min(1).values.max() == 0 and x.flatten(1).max(1).values.min() > 200     # white on black
    ink, ink_c = x[:, 0] > 127, (xc.float() - xc[:, :, :1, :1].float()).abs().amax(1) > 64   # the same pixels lit
    assert (ink == ink_c).float().mean() > 0.97


def test_data_classes_subset_reindexes():
    x, y, names = data.load("glyphs", split="test", image_size=8, classes=["7", "2"])
    full_x, full_y, _ = data.load("glyphs", split="test", image_size=8)
    assert names == ["7", "2"] and set(y.tolist()) == {0, 1}
    assert torch.equal(x[y == 0], full_x[full_y == 7]) and torch.equal(x[y == 1], full_x[full_y == 2])


# ---- 2-D point sets and their metrics --------------------------------------------------------------
def test_data_swirl():
    x, y, names = data.load("swirl")
    xt = data.load("swirl", split="test")[0]
    assert x.shape == xt.shape == (1024, 2) and x.dtype == torch.float32 and names == []
    assert (y == 0).all() and not torch.equal(x, xt)
    assert x.mean(0).abs().max() < 0.15 and (x.std(0) - 1).abs().max() < 0.1  # standardised
    assert x.abs().max() < 2.5
    mean, std = data.swirl_scale()
    u8 = x * std + mean  # the 8-bit values come back
    assert (u8 - u8.round()).abs().max() < 1e-3 and u8.min() >= 0 and u8.max() <= 255


def test_data_25gaussians():
    x, y, _ = data.load("25gaussians")
    xt, yt, _ = data.load("25gaussians", split="test")
    assert x.shape == (100_000, 2) and xt.shape == (2_500, 2)
    assert set(y.tolist()) == set(range(25)) and x.abs().max() > 4  # natural scale, not [-1, 1]
    means = torch.tensor([[-4 + 2 * (k // 5), -4 + 2 * (k % 5)] for k in range(25)], dtype=torch.float32)
    assert (x - means[y]).norm(dim=1).max() < 0.5


def test_data_score_2d():
    real = data.load("25gaussians", split="test")[0][:1000]
    s = data.score_2d(real, "25gaussians")
    assert s["modes"] == 25 and s["hq"] > 97 and s["kl"] < 0.05  # 2-D: 1 - exp(-4.5) = 98.9% within 3 std
    assert s["energy"] < 0.02 and s["energy_floor"] < 0.02
    collapsed = data.score_2d(torch.zeros(500, 2), "25gaussians")
    assert collapsed["modes"] == 1 and collapsed["hq"] == 100
    assert collapsed["kl"] == pytest.approx(math.log(25), abs=1e-6) and collapsed["energy"] > 1
    swirl = data.load("swirl", split="test")[0]
    good, shrunk = data.score_2d(swirl, "swirl"), data.score_2d(0.5 * swirl, "swirl")
    assert good["energy"] < 0.02 < shrunk["energy"] and "modes" not in good
    with pytest.raises(ValueError):
        data.score_2d(swirl, "glyphs")


# ---- batches ---------------------------------------------------------------------------------------
def test_data_to_float():
    assert data.to_float(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]
    p = torch.randn(5, 2)
    assert data.to_float(p) is p


def test_data_batches_shapes_range_flip():
    x = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    y = torch.arange(10)
    it = data.batches(x, y, 4, seed=0)
    seen = []
    for _ in range(2):  # one epoch: 10 // 4 = 2 full batches (drop_last)
        xb, yb = next(it)
        assert xb.shape == (4, 3, 4, 4) and xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert xb.min() >= -1 and xb.max() <= 1
        assert torch.equal(xb, data.to_float(x[yb]))  # no flip unless asked
        seen += yb.tolist()
    assert len(set(seen)) == 8  # shuffled without replacement within an epoch
    flipped = 0
    it = data.batches(x, y, 4, flip=True, seed=0)
    for _ in range(10):
        xb, yb = next(it)
        same = (xb == data.to_float(x[yb])).flatten(1).all(1)
        mirror = (xb == data.to_float(x[yb]).flip(3)).flatten(1).all(1)
        assert (same | mirror).all()
        flipped += int((mirror & ~same).sum())
    assert flipped > 0
    xb, yb = next(data.batches(x[:3], y[:3], 8))  # smaller than a batch: still yields
    assert xb.shape == (8, 3, 4, 4) and set(yb.tolist()) == {0, 1, 2}
    pts = torch.randn(6, 2)
    xb, yb = next(data.batches(pts, torch.arange(6), 3, flip=True))
    assert torch.equal(xb, pts[yb])  # points are never flipped


def test_data_batches_distributed_path():
    """One-process gloo group: the DistributedSampler path runs and reshuffles each epoch."""
    store = os.path.join(tempfile.mkdtemp(), "store")
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        it = data.batches(torch.zeros(8, 1, 2, 2, dtype=torch.uint8), torch.arange(8), 8)
        first, second = next(it)[1], next(it)[1]
        assert sorted(first.tolist()) == list(range(8)) and not torch.equal(first, second)
    finally:
        torch.distributed.destroy_process_group()


def _rank_worker(rank, store, out):
    """One of two gloo ranks: save the labels of its first epoch."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    it = data.batches(torch.zeros(40, 1, 2, 2, dtype=torch.uint8), torch.arange(40), 4)
    torch.save(torch.cat([next(it)[1] for _ in range(5)]), os.path.join(out, f"{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(not os.environ.get("TRILEMMA_SLOW"), reason="two spawned processes; flaky on a loaded 2-core machine, "
                    "set TRILEMMA_SLOW=1 (the torchrun CLI test covers DDP)")
def test_data_batches_two_ranks_get_disjoint_shards(tmp_path):
    torch.multiprocessing.spawn(_rank_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    a, b = (set(torch.load(tmp_path / f"{r}.pt", weights_only=True).tolist()) for r in (0, 1))
    assert len(a) == len(b) == 20 and not a & b


# ---- pictures --------------------------------------------------------------------------------------
def test_data_save_grid(tmp_path):
    x = torch.rand(16, 3, 16, 16) * 2 - 1
    path = tmp_path / "new" / "grid.png"
    data.save_grid(x, str(path), nrow=4)
    assert Image.open(path).size == (4 * 4 * 17 + 4, 4 * 4 * 17 + 4)  # 1-px padding, x4 upscale
    data.save_grid(x, str(path), nrow=4, real=torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    assert Image.open(path).size == (276, 276 + 4 * (2 + 18))  # + gap + one real row
    data.save_grid(torch.zeros(10, 1, 8, 8), str(path))  # 1 channel, default nrow = ceil(sqrt(10)) = 4
    assert Image.open(path).size == (4 * (4 * 9 + 1), 4 * (3 * 9 + 1))
    assert os.listdir(path.parent) == ["grid.png"]  # no temporary file left behind


def test_data_save_scatter(tmp_path):
    real = data.load("swirl")[0]
    data.save_scatter(real[:100], str(tmp_path / "s.png"), "swirl", real=real)
    assert Image.open(tmp_path / "s.png").size == (400, 400)
    data.save_scatter([real, 100 * real], str(tmp_path / "p.png"), "swirl", titles=["a", "b"])
    img = np.asarray(Image.open(tmp_path / "p.png"))
    assert img.shape == (420, 810, 3) and (img != 255).any()


# ---- real images and errors ------------------------------------------------------------------------
def test_data_image_folder(tmp_path):
    for split in ("train", "test"):
        for k, cls in enumerate(["ant", "bee"]):
            os.makedirs(tmp_path / split / cls)
            for i in range(3 if split == "train" else 1):
                Image.new("RGB", (24, 20), (40 * k, 100, 200)).save(tmp_path / split / cls / f"{i}.png")
    x, y, names = data.load(str(tmp_path), image_size=8)
    assert x.shape == (6, 3, 8, 8) and x.dtype == torch.uint8 and names == ["ant", "bee"]
    xt, yt, _ = data.load(str(tmp_path), split="test", image_size=8)
    assert xt.shape == (2, 3, 8, 8) and yt.tolist() == [0, 1]
    x, y, names = data.load(str(tmp_path), image_size=8, classes=["1"])
    assert names == ["bee"] and y.tolist() == [0, 0, 0] and (x[:, 0] == 40).all()
    with pytest.raises(ValueError, match="ant, bee"):
        data.load(str(tmp_path), classes=["wasp"])


def test_data_folder_keeps_channels_and_holds_out_a_split(tmp_path):
    """A grayscale folder stays 1-channel; train/ without test/ keeps its classes and holds every 10th image out;
    the real row under a grid shows several classes."""
    for c in ("a", "b", "c"):
        os.makedirs(tmp_path / "train" / c)
        for i in range(20):
            value = 10 * i + "abc".index(c) * 3                                    # unique per image
            Image.fromarray(np.full((10, 10), value, np.uint8)).save(tmp_path / "train" / c / f"{i:02d}.png")
    x, y, names = data.load(str(tmp_path), "train", 8)
    xt, yt, _ = data.load(str(tmp_path), "test", 8)
    assert x.shape == (54, 1, 8, 8) and xt.shape == (6, 1, 8, 8) and names == ["a", "b", "c"]
    assert set(yt.tolist()) == {0, 1, 2}
    row_labels = [int(y[(x == r).flatten(1).all(1)].unique().item()) for r in data.real_row(x, y, 6)]
    assert row_labels == [0, 1, 2, 0, 1, 2]


def test_data_cifar10_jpeg_folder(tmp_path):
    want = {f"{s}/{c}/000{i}.jpg" for s in ("train", "test") for c in ("airplane", "automobile") for i in (0, 1)}
    with tarfile.open(_need_shared("cifar10-jpeg.tar.gz")) as tar:
        for member in tar:  # stop early: the tarball lists test/ first, then train/ in class order
            if member.name in want:
                tar.extract(member, tmp_path, filter="data")
                want.discard(member.name)
                if not want:
                    break
    x, y, names = data.load(str(tmp_path), classes=["automobile"])
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 0] and names == ["automobile"]
    xt = data.load(str(tmp_path), split="test", image_size=32)[0]
    assert xt.shape == (4, 3, 32, 32) and not torch.equal(xt, data.load(str(tmp_path), image_size=32)[0])


def test_data_cifar10_from_tarball_one_class():
    d = os.path.dirname(_need_shared("cifar10-jpeg.tar.gz"))
    if os.path.isdir(os.path.join(d, "cifar-10-batches-py")):
        pytest.skip("a torchvision copy takes precedence there")
    x, y, names = data.load("cifar10", "test", 16, d, ["airplane"])
    assert x.shape == (1000, 3, 16, 16) and names == ["airplane"] and (y == 0).all()
    with pytest.raises(ValueError, match="unknown class"):
        data.load("cifar10", "test", 16, d, ["zebra"])


def test_data_mnist_offline():
    _need_shared("MNIST", "raw")
    x, y, names = data.load("mnist", split="test", data_dir=SHARED)
    assert x.shape == (10_000, 1, 16, 16) and x.dtype == torch.uint8 and len(names) == 10
    assert set(y.tolist()) == set(range(10))


def test_data_stackedmnist_shapes_labels_and_scores():
    _need_shared("MNIST", "raw")
    x, y, names = data.load("stackedmnist", "test", 16, SHARED)
    assert x.shape == (10_000, 3, 16, 16) and x.dtype == torch.uint8 and len(names) == 1000
    assert y.min() >= 0 and y.max() < 1000 and len(y.unique()) > 990    # 10,000 draws cover ~all 1000 modes
    digits, dy, _ = data.load("mnist", "test", 16, SHARED)
    # every channel is an MNIST test digit, and the label spells the three digits
    for i in range(3):
        c = [((digits[:, 0] == x[i, k]).flatten(1).all(1)).nonzero()[:, 0] for k in range(3)]
        assert 100 * dy[c[0][0]] + 10 * dy[c[1][0]] + dy[c[2][0]] == y[i]
    x2, y2, _ = data.load("stackedmnist", "test", 16, SHARED, seed=1)
    assert not torch.equal(y, y2) and torch.equal(y, data.load("stackedmnist", "test", 16, SHARED)[1])


def test_data_bad_input_raises_value_error(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)  # never download in a test
    with pytest.raises(ValueError, match="offline"):
        data.load("cifar10", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load(str(tmp_path / "missing_folder"))
    with pytest.raises(ValueError, match="unknown class"):
        data.load("glyphs", image_size=8, classes=["cat"])
    with pytest.raises(ValueError):
        data.load("glyphs", split="val")
    with pytest.raises(ValueError):
        data.load("glyphs", image_size=4)
    assert data.is_2d("swirl") and data.is_2d("25gaussians") and not data.is_2d("glyphs")


# ---- image scores: Frechet distance, classifier features, fd_scores --------------------------------
def _exact(n, mean, cov, seed):
    """n points whose sample mean and (unbiased) covariance are exactly `mean` and `cov`."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T   # whitened: identity sample covariance
    return z @ torch.linalg.cholesky(cov).T + mean


def test_data_frechet_self_zero_and_grows_with_shift():
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert abs(data.frechet(x, x)) < 1e-8
    shifts = [data.frechet(x, x + d) for d in (0.5, 1.0, 2.0)]
    assert shifts == sorted(shifts) and shifts[0] > 0
    assert math.isclose(shifts[1], 16 * 1.0 ** 2, rel_tol=1e-9)      # a pure shift adds |d|^2 per dimension


def test_data_frechet_matches_closed_form_for_two_gaussians():
    # 2 x 2 covariances that do not commute: tr((A B)^1/2) = sqrt(tr(A B) + 2 sqrt(det(A B))) for 2 x 2 PSD
    A = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
    B = torch.tensor([[0.5, -0.2], [-0.2, 1.5]], dtype=torch.float64)
    mu_a, mu_b = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64)
    AB = A @ B
    tr_root = math.sqrt(AB.trace() + 2 * math.sqrt(torch.linalg.det(AB)))
    expected = float((mu_a - mu_b).pow(2).sum() + A.trace() + B.trace() - 2 * tr_root)
    got = data.frechet(_exact(400, mu_a, A, 1), _exact(300, mu_b, B, 2))
    assert math.isclose(got, expected, rel_tol=1e-9)
    with pytest.raises(ValueError):
        data.frechet(torch.zeros(1, 2), torch.zeros(5, 2))


def test_data_classifier_accuracy_and_features(tmp_path, monkeypatch):
    """glyphs-mono 8x8, 2 epochs: the classifier reads real test digits (>= 95%), and in its penultimate
    features real test images lie far closer to real training images than noise does."""
    name = "glyphs-mono"
    net, acc, names = data.classifier(name, 8, str(tmp_path), None, 2)
    assert acc >= 95 and len(names) == 10
    monkeypatch.setattr(data, "classifier", lambda *args, **kw: (net, acc, names))  # score_images(), features()
    real, train = data.load(name, "test", 8)[0][:500], data.load(name, "train", 8)[0][:500]
    f_real = data.features(real, name, 8, str(tmp_path))                   # uint8 in, as well as [-1, 1]
    assert f_real.shape == (500, 128) and torch.equal(f_real, data.features(data.to_float(real), name, 8))
    floor = data.frechet(data.features(train, name, 8), f_real)
    noise = data.frechet(data.features(torch.rand(500, 1, 8, 8) * 2 - 1, name, 8), f_real)
    assert noise > 20 * floor
    # legibility: real digits count, smooth blobs (made differently from the reject class's) and mode averages do not
    assert data.score_images(data.to_float(real), name, 8)["legible"] > 95
    g = torch.Generator().manual_seed(0)
    for sigma in (1.0, 1.5, 2.5):
        k = torch.exp(-torch.arange(-6.0, 7.0) ** 2 / (2 * sigma ** 2))
        k = (k / k.sum()).view(1, 1, 1, -1)
        z = torch.randn(500, 1, 20, 20, generator=g)
        z = F.conv2d(F.conv2d(z, k), k.transpose(2, 3))[:, :, :8, :8]       # Gaussian-smoothed noise, 8x8
        blobs = (z / z.flatten(1).std(1).view(-1, 1, 1, 1) * 0.7).clamp(-1, 1)
        assert data.score_images(blobs, name, 8)["legible"] < 5, sigma
    average = sum(data.to_float(real).roll(i, 0) for i in range(6)) / 6     # what a mode-averaging G draws
    assert data.score_images(average, name, 8)["legible"] < 5
    ro = tmp_path / "ro"                                                 # a read-only --data-dir (../shared/data)
    ro.mkdir(mode=0o555)                                                 # keeps its classifier cache in ./data
    assert not data._writable(str(ro)) and data._writable(str(tmp_path))


def test_data_fd_scores_real_near_floor_noise_far():
    """fd of real held-out images is near fd_floor; smooth noise is far above it."""
    a = dict(data="glyphs", image_size=8, data_dir="./data", classes=["0", "1"], seed=0)
    real = data.to_float(data.load("glyphs", "test", 8, "./data", ["0", "1"], 0)[0][:200])
    noise = torch.nn.functional.avg_pool2d(torch.rand(200, 3, 8, 8) * 2 - 1, 3, 1, 1)
    r, n = data.fd_scores(a, real), data.fd_scores(a, noise)
    assert r["fd_floor"] == n["fd_floor"] and r["fd_floor"] > 0
    assert r["fd"] < 2 * r["fd_floor"] and n["fd"] > 10 * r["fd_floor"]


# ====================================================================================================
# unet.py: the UNet, the discriminators and the MLP
def _t(B):
    return torch.rand(B) * 1000


@pytest.mark.parametrize("kwargs, y, z", [
    (dict(), None, None),                                        # plain
    (dict(num_classes=10), torch.tensor([0, 9, -1, 3]), None),   # labels incl. the null class
    (dict(num_classes=10), None, None),                          # y=None -> all null
    (dict(z_dim=8), None, torch.randn(4, 8)),                    # DDGAN generator latent
    (dict(num_classes=10, z_dim=8), torch.tensor([1, -1, 2, 5]), torch.randn(4, 8)),
])
def test_unet_shapes(kwargs, y, z):
    torch.manual_seed(0)
    m = unet.UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, image_size=8, **kwargs)
    out = m(torch.randn(4, 3, 8, 8), _t(4), y=y, z=z)
    assert out.shape == (4, 3, 8, 8)


def test_unet_mnist_attention_tanh():
    torch.manual_seed(0)
    m = unet.UNet(in_ch=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_res=(4,), image_size=8, out_act="tanh")
    assert any(isinstance(mod, unet._Attention) for mod in m.modules())
    for p in m.conv_out.parameters():  # make the output non-trivial so tanh's range is tested
        torch.nn.init.normal_(p, std=10.0)
    out = m(torch.randn(3, 1, 8, 8), _t(3))
    assert out.shape == (3, 1, 8, 8)
    assert out.abs().max() <= 1 and out.abs().max() > 0.5


def test_unet_out_ch():
    m = unet.UNet(in_ch=3, out_ch=6, ch=16, ch_mult=(1,), num_res_blocks=1, image_size=4)
    assert m(torch.randn(2, 3, 4, 4), _t(2)).shape == (2, 6, 4, 4)


def test_unet_bad_image_size():
    with pytest.raises(ValueError, match="image size 18 cannot be halved 3 times"):
        unet.UNet(ch=16, ch_mult=(1, 2, 2, 2), image_size=18)
    with pytest.raises(ValueError):
        unet.Discriminator(ch=16, ch_mult=(1, 2, 2), image_size=6)
    with pytest.raises(ValueError):
        unet.UNet(ch=16, ch_mult=(1, 2), image_size=8, attn_res=(16,))  # not a resolution of this net


def test_unet_zero_at_init_but_trainable():
    torch.manual_seed(0)
    m = unet.UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_res=(4,), image_size=8, dropout=0.0)
    x, t = torch.randn(4, 3, 8, 8), _t(4)
    assert m(x, t).abs().max() == 0
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ((m(x, t) - x) ** 2).mean().backward()  # at init only conv_out has a gradient
    opt.step()
    opt.zero_grad()
    ((m(x, t) - x) ** 2).mean().backward()
    assert m.conv_in.weight.grad.abs().sum() > 0  # after one step the gradient reaches the input conv


def test_unet_generator_init_depends_on_z():
    # DDGAN's G (zero_init=False, Xavier-initialised z mapping and style layers as the official code): the output
    # varies with z from step 0 by a good fraction of how it varies with x_t (with PyTorch's default Linear init it
    # is ~2%: a z-blind G); the denoiser default (zero_init=True) still starts at exactly 0
    torch.manual_seed(0)
    g = unet.UNet(in_ch=1, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, image_size=16, dropout=0.0, z_dim=100,
                  out_act="tanh", zero_init=False)
    x, t = torch.randn(32, 1, 16, 16), torch.full((32,), 500.0)
    z1, z2 = torch.randn(32, 100), torch.randn(32, 100)
    with torch.no_grad():
        over_z, over_x = (g(x, t, z=z1) - g(x, t, z=z2)).std(), (g(x, t, z=z1) - g(x.roll(1, 0), t, z=z1)).std()
    assert over_z > 0.1 * over_x, (over_z, over_x)
    d = unet.UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, image_size=8, z_dim=8)
    assert d(torch.randn(4, 3, 8, 8), _t(4), z=torch.randn(4, 8)).abs().max() == 0


def test_unet_timestep_embedding():
    e = unet.timestep_embedding(torch.tensor([0.0, 1.0, 999.0]), 9)
    assert e.shape == (3, 9)
    assert torch.allclose(e[0, :4], torch.zeros(4)) and torch.allclose(e[0, 4:8], torch.ones(4))


def test_unet_discriminator_logits_and_r1():
    torch.manual_seed(0)
    d = unet.Discriminator(in_ch=6, ch=16, ch_mult=(1, 2), num_res_blocks=1, image_size=8)
    for B in (4, 6, 7, 1):  # 6 and 7 are not divisible by the group size 4
        assert d(torch.randn(B, 6, 8, 8), _t(B)).shape == (B,)
    x = torch.randn(6, 6, 8, 8, requires_grad=True)
    logits = d(x, _t(6))
    assert logits.abs().min() > 0
    (g,) = torch.autograd.grad(logits.sum(), x, create_graph=True)  # R1: grad wrt the real input
    r1 = g.pow(2).sum()
    r1.backward()  # double backward reaches D's parameters
    assert torch.isfinite(r1) and r1 > 0
    assert d.conv_in.weight.grad.abs().sum() > 0


def test_unet_discriminator_sees_per_sample_brightness():
    # DDGAN's D has no normalisation layer: a GroupNorm after conv_in would divide out a constant shift of the
    # input (all but the zero-padded border), so a too-bright fake would look like a real image to D
    torch.manual_seed(0)
    d = unet.Discriminator(in_ch=6, ch=16, ch_mult=(1, 2), num_res_blocks=1, image_size=8)
    x, t = torch.randn(4, 6, 8, 8), _t(4)
    assert (d(x + 1.0, t) - d(x, t)).abs().min() > 1e-3
    assert not any(isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d)) for m in d.modules())


def test_unet_small_discriminator_shapes_t_terms_and_spectral_norm():
    torch.manual_seed(0)
    d = unet.SmallDiscriminator(in_ch=2, ch=8, image_size=16)
    x = torch.randn(5, 2, 16, 16, requires_grad=True)
    logits = d(x, _t(5))
    assert logits.shape == (5,) and torch.isfinite(logits).all()
    d.eval()                                                                   # no power iteration in between
    assert torch.allclose(d(x, torch.zeros(5)), d(x, torch.full((5,), 999.0)))   # t terms start at zero
    d.train()
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)         # R1 stays possible
    grad.pow(2).sum().backward()
    assert d.convs[0].parametrizations.weight.original.grad.abs().sum() > 0
    for _ in range(30):                                                        # power iterations in train mode
        d(x.detach(), _t(5))
    for conv in d.convs:                                                       # each layer is ~1-Lipschitz
        w = conv.weight.detach().flatten(1)
        assert abs(torch.linalg.matrix_norm(w, 2).item() - 1) < 0.05
    with pytest.raises(ValueError):
        unet.SmallDiscriminator(image_size=10)


def test_unet_mlp_activation_choice():
    x, t = torch.randn(5, 2), _t(5)
    torch.manual_seed(0)
    a = unet.MLP(in_dim=2, out_dim=1, hidden=16, zero_out=False, act="lrelu")
    torch.manual_seed(0)
    b = unet.MLP(in_dim=2, out_dim=1, hidden=16, zero_out=False)
    assert not torch.allclose(a(x, t), b(x, t))  # same weights, different nonlinearity
    with pytest.raises(ValueError, match="act must be"):
        unet.MLP(act="tanh")


def test_unet_mlp_shapes():
    x, t = torch.randn(5, 2), _t(5)
    den = unet.MLP(hidden=32, num_classes=3)
    assert den(x, t).shape == (5, 2) and den(x, t).abs().max() == 0  # zero_out: denoiser starts at 0
    assert den(x, t, y=torch.tensor([0, 1, 2, -1, 0])).shape == (5, 2)
    gen = unet.MLP(hidden=32, z_dim=4, out_act="tanh")
    assert gen(x, t, z=torch.randn(5, 4)).shape == (5, 2)
    disc = unet.MLP(in_dim=4, out_dim=1, hidden=32, zero_out=False)
    logits = disc(torch.randn(5, 4), t)
    assert logits.shape == (5, 1) and logits.abs().min() > 0


def test_unet_mlp_in_and_out_scale():
    x, t = torch.randn(5, 2), _t(5)
    torch.manual_seed(0)
    a = unet.MLP(hidden=16, zero_out=False, in_scale=4.0, out_scale=0.25)
    torch.manual_seed(0)
    b = unet.MLP(hidden=16, zero_out=False)
    assert torch.allclose(a(x, t), 0.25 * b(4 * x, t), atol=1e-6)


# ====================================================================================================
# ddpm.py
# ---- schedule, forward process, samplers and loss --------------------------------------------------
@pytest.mark.parametrize("kind", ["vp", "cosine"])
@pytest.mark.parametrize("T", [1, 2, 4, 20, 50, 1000, 4000])
def test_ddpm_schedule_valid_for_every_T(kind, T):
    s = ddpm.make_schedule(T, kind)
    beta, ab = s["beta"].double(), s["alpha_bar"].double()
    assert beta.shape == (T,) and torch.all(beta > 0) and torch.all(beta < 1)
    assert torch.all(ab[1:] < ab[:-1])                                 # monotone decreasing
    if T in (4, 50, 1000):
        assert ab[-1] < 1e-3                                           # x_T is close to N(0, I)


def test_ddpm_vp_schedule_is_near_the_papers_linear_at_T1000():
    beta = ddpm.make_schedule(1000, "vp")["beta"].double()             # the default vp: the paper's within 3e-4
    paper = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert abs(beta[0] - 1e-4) < 2e-5 and abs(beta[-1] - 0.02) < 3e-4
    assert (beta - paper).abs().max() < 3e-4


@pytest.mark.parametrize("T", [1, 2, 20, 1000])
def test_ddpm_linear_schedule_is_the_papers_linspace(T):
    beta = ddpm.make_schedule(T, "linear")["beta"]
    assert torch.equal(beta, torch.linspace(1e-4, 0.02, T, dtype=torch.float64).float())


def test_ddpm_vp_default_reaches_noise_at_small_T_where_linear_does_not():
    assert ddpm.get_parser().parse_args([]).schedule == "vp"
    assert ddpm.make_schedule(20)["alpha_bar"][-1] < 1e-3                # vp: x_T ~ N(0, I) at T = 20
    assert ddpm.make_schedule(20, "linear")["alpha_bar"][-1] > 0.5       # the paper's linspace: far from it


def test_ddpm_q_sample_mean_and_variance():
    torch.manual_seed(0)
    s = ddpm.make_schedule(100)
    x0 = torch.full((200_000, 1), 0.7)
    t = torch.full((200_000,), 30, dtype=torch.long)
    xt = ddpm.q_sample(s, x0, t, torch.randn_like(x0))
    ab = s["alpha_bar"][29].item()
    assert abs(xt.mean().item() - math.sqrt(ab) * 0.7) < 0.01
    assert abs(xt.var().item() - (1 - ab)) < 0.01


def test_ddpm_posterior_matches_gaussian_conditioning():
    """q(x_{t-1} | x_t, x0) from Bayes' rule on q(x_{t-1} | x0) and q(x_t | x_{t-1}), in float64."""
    s = ddpm.make_schedule(50)
    x0, xt = torch.tensor([[0.3], [-0.8]]), torch.tensor([[1.1], [0.2]])
    for step in (2, 17, 50):
        t = torch.full((2,), step, dtype=torch.long)
        mean, var = ddpm.q_posterior(s, x0, xt, t)
        ab_prev, alpha = s["alpha_bar_prev"][step - 1].double(), s["alpha"][step - 1].double()
        beta = 1 - alpha
        prec = 1 / (1 - ab_prev) + alpha / beta
        mean_ref = (ab_prev.sqrt() * x0.double() / (1 - ab_prev) + alpha.sqrt() * xt.double() / beta) / prec
        assert torch.allclose(mean.double(), mean_ref, atol=1e-5)
        assert torch.allclose(var.double().flatten(), (1 / prec).expand(2), rtol=1e-4)


def toy_eps(T):
    """A fixed, non-trivial eps_theta(x_t, t) for sampler identities."""
    return lambda x, t, y=None: torch.tanh(0.5 * x + t.float().view(-1, *[1] * (x.dim() - 1)) / T)


@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_ddim_eta1_full_equals_ancestral_beta_tilde(clip):
    T, shape = 30, (4, 3, 2, 2)
    s = ddpm.make_schedule(T)
    a = ddpm.sample_ancestral(toy_eps(T), s, shape, var="beta_tilde", clip=clip,
                              generator=torch.Generator().manual_seed(1))
    b = ddpm.sample_ddim(toy_eps(T), s, shape, S=T, eta=1.0, clip=clip, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a, b, atol=1e-4)
    c = ddpm.sample_ancestral(toy_eps(T), s, shape, var="beta", clip=clip, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c, atol=1e-4)                          # the variance choice matters


def test_ddpm_ddim_steps_and_eta0_is_deterministic_given_x_T():
    assert ddpm.ddim_steps(1000, 50)[0] == 1000 and ddpm.ddim_steps(1000, 50)[-1] == 1
    assert len(ddpm.ddim_steps(1000, 50)) == 50 and ddpm.ddim_steps(7, 7) == list(range(7, 0, -1))
    T, s = 40, ddpm.make_schedule(40)
    a = ddpm.sample_ddim(toy_eps(T), s, (3, 2), S=10, eta=0.0, clip=False, generator=torch.Generator().manual_seed(5))
    b = ddpm.sample_ddim(toy_eps(T), s, (3, 2), S=10, eta=0.0, clip=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_ddpm_ancestral_last_step_returns_x0_hat():
    """At t = 1 the posterior mean is x0_hat itself (coef_x0 = 1, coef_xt = 0) and no noise is added."""
    s = ddpm.make_schedule(10)
    assert abs(s["coef_x0"][0].item() - 1) < 1e-5 and abs(s["coef_xt"][0].item()) < 1e-5


def test_ddpm_loss_simple_is_finite_and_trains_every_parameter():
    torch.manual_seed(0)
    model = unet.UNet(in_ch=3, ch=16, ch_mult=(1, 2), num_res_blocks=1, image_size=8)
    s = ddpm.make_schedule(100)
    net = ddpm.eps_fn(model, 100, "float32")
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    loss = ddpm.loss_simple(net, s, x0)
    assert torch.isfinite(loss) and 0.5 < loss.item() < 1.5             # zero-initialised output: ~E[eps^2] = 1
    loss.backward()
    assert model.conv_out.weight.grad.abs().sum() > 0                  # the zero-initialised output conv learns


# ---- the command line end to end -------------------------------------------------------------------
def test_ddpm_cli_train_resume_sample(tmp_path, tiny_folder, capsys):
    out = tmp_path / "run"
    # one real subprocess run, as a user types it
    r = run_cli("ddpm.py", "--data", tiny_folder, *TINY_UNET, "--T", 20, "--steps", 4, "--sample-every", 2,
                "--ckpt-every", 2, "--n-samples", 4, "--out", out)
    assert r.returncode == 0, r.stderr
    for f in ("ckpt.pt", "samples.png", "samples_0000002.png", "log.txt", "metrics.json"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "ddpm" and m["nfe"] == 20 and m["step"] == 4 and m["sec_per_100"] > 0
    assert "NFE 20 per sample" in r.stdout and "s per 100 samples" in r.stdout
    # a second run into the same folder must not overwrite the checkpoint
    before = (out / "ckpt.pt").read_bytes()
    assert main_exit(ddpm.main, ["--data", tiny_folder, *TINY_UNET, "--T", 20, "--steps", 4, "--out", out]) == 2
    assert "--resume" in capsys.readouterr().err and (out / "ckpt.pt").read_bytes() == before
    # --resume continues from step 4 to step 6
    assert main_exit(ddpm.main, ["--data", tiny_folder, *TINY_UNET, "--T", 20, "--steps", 6, "--n-samples", 4,
                                 "--out", out, "--resume"]) == 0
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 6
    assert "steps 4..6" in capsys.readouterr().out
    # --sample-only needs no training flags: DDIM with 5 steps, saved as uint8 NHWC .npz
    assert main_exit(ddpm.main, ["--sample-only", "--out", out, "--sample-steps", 5, "--eta", 0.5,
                                 "--n-samples", 6, "--save-npz"]) == 0
    arr = np.load(out / "samples_ddim5_eta0.5.npz")["arr_0"]
    assert arr.shape == (6, 8, 8, 3) and arr.dtype == np.uint8
    assert json.loads((out / "metrics_ddim5_eta0.5.json").read_text())["nfe"] == 5
    assert (out / "samples_ddim5_eta0.5.png").is_file()


def test_ddpm_2d_in_process(tmp_path):
    out = tmp_path / "g"
    ddpm.main(["--data", "25gaussians", "--steps", "5", "--batch-size", "64", "--hidden", "32", "--T", "10",
               "--n-samples", "200", "--out", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    assert {"energy", "energy_floor", "modes", "hq", "kl"} <= set(m) and m["nfe"] == 10
    assert Image.open(out / "samples.png").size == (400, 400)


@pytest.mark.parametrize("flags, message", [
    (["--data", "nosuchdata"], "unknown dataset"),
    (["--data", "/no/such/folder"], "unknown dataset"),
    (["--T", "0"], "--T"),
    (["--T", "10", "--sample-steps", "11"], "--sample-steps"),
    (["--image-size", "18", "--ch-mult", "1", "2", "2"], "cannot be halved"),
    (["--schedule", "quadratic"], "invalid choice"),
    (["--stepz", "3"], "unrecognized"),
])
def test_ddpm_bad_flags_exit_2(tmp_path, flags, message, capsys):
    assert main_exit(ddpm.main, [*flags, "--steps", 1, "--out", tmp_path / "bad"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad" / "ckpt.pt").exists()


def test_ddpm_bad_flag_from_the_shell(tmp_path):
    r = run_cli("ddpm.py", "--T", 0, "--out", tmp_path)
    assert r.returncode == 2 and "--T must be at least 1" in r.stderr and "Traceback" not in r.stderr


def test_ddpm_bad_checkpoints(tmp_path, capsys):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert main_exit(ddpm.main, ["--sample-only", "--out", tmp_path / "corrupt"]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert main_exit(ddpm.main, ["--sample-only", "--out", tmp_path / "missing"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    torch.save({"method": "ddgan", "step": 1}, tmp_path / "other" / "ckpt.pt")
    assert main_exit(ddpm.main, ["--sample-only", "--out", tmp_path / "other"]) == 2
    assert "not a ddpm checkpoint" in capsys.readouterr().err
    assert main_exit(ddpm.main, ["--resume", "--out", tmp_path / "other", "--steps", 2]) == 2
    assert "not a ddpm checkpoint" in capsys.readouterr().err
    assert torch.load(tmp_path / "other" / "ckpt.pt", weights_only=True)["method"] == "ddgan"  # untouched


def test_ddpm_sample_only_rejects_too_many_steps_and_runs_bfloat16(tmp_path, tiny_folder, capsys):
    out = tmp_path / "bf16"
    assert main_exit(ddpm.main, ["--data", tiny_folder, *TINY_UNET, "--T", 10, "--steps", 2, "--n-samples", 2,
                                 "--dtype", "bfloat16", "--out", out]) == 0
    assert math.isfinite(json.loads((out / "metrics.json").read_text())["loss"])
    assert main_exit(ddpm.main, ["--sample-only", "--out", out, "--sample-steps", 11]) == 2
    assert "larger than the checkpoint's T=10" in capsys.readouterr().err


def test_ddpm_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path, tiny_folder, monkeypatch):
    out = tmp_path / "nan"
    ddpm.main(["--data", tiny_folder, *map(str, TINY_UNET), "--T", "10", "--steps", "2", "--n-samples", "2",
               "--out", str(out)])
    before = (out / "ckpt.pt").read_bytes()
    monkeypatch.setattr(ddpm, "loss_simple", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True) * 1)
    with pytest.raises(SystemExit) as e:
        ddpm.main(["--data", tiny_folder, *map(str, TINY_UNET), "--T", "10", "--steps", "4", "--out", str(out),
                   "--resume"])
    assert e.value.code == 1
    assert (out / "ckpt.pt").read_bytes() == before


def test_ddpm_image_folder_cifar(tmp_path, cifar_folder):
    out = tmp_path / "cifar"
    ddpm.main(["--data", cifar_folder, "--classes", "airplane", *map(str, TINY_UNET), "--T", "10", "--steps", "2",
               "--n-samples", "4", "--out", str(out)])
    assert (out / "samples.png").is_file()
    assert json.loads((out / "metrics.json").read_text())["data"] == cifar_folder


def test_ddpm_version1_checkpoint_linear_means_vp(tmp_path):
    """A version-1 checkpoint (no "version" key) names the VP curve "linear": loading it (to sample or to resume)
    reads vp, so it samples the curve it was trained on; a version-2 checkpoint's "linear" stays linear."""
    out = tmp_path / "new"
    ddpm.main(["--data", "25gaussians", "--steps", "2", "--batch-size", "16", "--hidden", "16", "--layers", "1",
               "--T", "10", "--n-samples", "20", "--out", str(out)])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["args"]["schedule"] == "vp" and ckpt["args"]["version"] == ddpm.VERSION
    for name, version, want in (("old", None, "vp"), ("linear", ddpm.VERSION, "linear")):
        (tmp_path / name).mkdir()
        args = {k: v for k, v in ckpt["args"].items() if k != "version"}
        torch.save(dict(ckpt, args=dict(args, schedule="linear", **({"version": version} if version else {}))),
                   tmp_path / name / "ckpt.pt")
        assert ddpm.load(str(tmp_path / name / "ckpt.pt"))[1]["schedule"] == want
    samples = [ddpm.generate(*ddpm.load(str(tmp_path / d / "ckpt.pt")), n=20) for d in ("new", "old", "linear")]
    assert torch.equal(samples[0], samples[1]) and not torch.equal(samples[0], samples[2])
    ddpm.main(["--steps", "3", "--n-samples", "20", "--out", str(tmp_path / "old"), "--resume"])
    assert torch.load(tmp_path / "old" / "ckpt.pt", weights_only=True)["args"]["schedule"] == "vp"


# ---- class-conditional DDPM with classifier-free guidance ------------------------------------------
def test_ddpm_guidance_is_the_cfg_formula_and_changes_samples():
    torch.manual_seed(0)
    a = dict(data="glyphs", ch=8, ch_mult=[1], num_res_blocks=1, attn_res=[], dropout=0.0, temb_dim=None,
             image_size=8, cond=True, class_names=["0", "1", "2"])
    model = ddpm.build_model(a, 3).eval()
    for p in model.parameters():                                          # undo the zero inits: the label matters
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 5, 10]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        e_c, e_null = ddpm.eps_fn(model, 10, "float32")(x, t, y), ddpm.eps_fn(model, 10, "float32")(x, t, -1 + 0 * y)
        assert torch.equal(e_c, model(x, t * 100.0, y))                  # w = 0: the conditional model
        assert torch.allclose(ddpm.eps_fn(model, 10, "float32", 1.0)(x, t, y), 2 * e_c - e_null, atol=1e-5)
    assert not torch.allclose(e_c, e_null)
    cfg = dict(a, channels=3, T=10, schedule="vp", var="beta", eta=0.0, clip_x0=True, labels=None, guidance=1.0)
    x0, x1 = (ddpm.generate(model, cfg, n=6, guidance=w) for w in (0.0, 1.0))
    assert x0.shape == x1.shape == (6, 3, 8, 8) and torch.isfinite(x1).all() and not torch.equal(x0, x1)


TINY_COND = ["--data", "glyphs", *TINY_UNET, "--classes", 0, 1, "--T", 10, "--n-samples", 4, "--cond"]


def test_ddpm_conditional_trains_resumes_and_samples_with_labels(tmp_path, capsys):
    out = tmp_path / "cond"
    assert main_exit(ddpm.main, [*TINY_COND, "--steps", 2, "--labels", 1, "--out", out]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["sampler"] == "ancestral_beta_w1.0_labels1" and m["nfe"] == 20 and m["n_samples"] == 4   # guided: 2 calls
    assert "T 10 vp cond" in capsys.readouterr().out
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["args"]["cond"] and ckpt["args"]["class_names"] == ["0", "1"]
    assert ckpt["ema"]["label_emb.weight"].shape[0] == 3                  # two classes and the null class
    assert main_exit(ddpm.main, ["--steps", 3, "--n-samples", 4, "--out", out, "--resume"]) == 0
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3
    assert main_exit(ddpm.main, ["--sample-only", "--out", out, "--n-samples", 6, "--labels", 1, 0, "--guidance", 0,
                                 "--sample-steps", 4, "--save-npz"]) == 0
    npz = np.load(out / "samples_ddim4_eta0.0_w0.0_labels1-0.npz")
    assert npz["arr_0"].shape == (6, 8, 8, 3) and npz["arr_1"].tolist() == [1, 1, 1, 0, 0, 0]
    m = json.loads((out / "metrics_ddim4_eta0.0_w0.0_labels1-0.json").read_text())
    assert m["nfe"] == 4 and "label_acc" in m and 0 <= m["label_acc"] <= 100


@pytest.mark.parametrize("argv, message", [
    ([*TINY_COND, "--labels", 7], "unknown label '7'"),                   # --classes 0 1: no class 7
    (["--data", "glyphs", "--labels", 3], "--labels needs --cond"),
    (["--data", "25gaussians", "--cond"], "--cond needs labelled image data"),
    ([*TINY_COND, "--p-uncond", 1.0], "--p-uncond"),
])
def test_ddpm_bad_conditional_flags_exit_2_with_one_line(tmp_path, capsys, argv, message):
    assert main_exit(ddpm.main, [*argv, "--steps", 1, "--out", tmp_path / "bad"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad" / "ckpt.pt").exists()


def test_ddpm_sample_only_rejects_bad_labels(tmp_path, capsys):
    out = tmp_path / "u"
    assert main_exit(ddpm.main, ["--data", "glyphs", *TINY_UNET, "--classes", 0, 1, "--T", 5, "--steps", 1,
                                 "--n-samples", 2, "--out", out]) == 0
    capsys.readouterr()
    assert main_exit(ddpm.main, ["--sample-only", "--out", out, "--labels", 1]) == 2   # an unconditional checkpoint
    err = capsys.readouterr().err.strip()
    assert "needs a conditional checkpoint" in err and len(err.splitlines()) == 1
    assert not any(f.startswith("samples_") for f in os.listdir(out))


# ====================================================================================================
# vdm.py
VDM_PY = os.path.join(HERE, "vdm.py")
TINY_VDM = ["--ch", "8", "--ch-mult", "1", "--image-size", "8", "--classes", "0", "1", "--n-samples", "4",
        "--sample-steps", "3", "--log-every", "1e-9"]


def vdm_args(**kw):
    """The args dict build_model reads, for a tiny model (images 8x8 by default)."""
    a = dict(data="glyphs", channels=3, fourier=[7, 8], ch=8, ch_mult=[1], num_res_blocks=1, attn_res=[],
             dropout=0.0, temb_dim=None, image_size=8, cond=False, class_names=[str(i) for i in range(10)],
             schedule="fixed", gamma_min=-13.3, gamma_max=5.0, latent=False, hidden=32, layers=2)
    a.update(kw)
    return a


def swirl_model(schedule="fixed"):
    """A tiny 2-D VDM (MLP) on the swirl's 8-bit grid, with a non-zero output layer so eps_hat depends on z."""
    torch.manual_seed(0)
    m = vdm.build_model(vdm_args(data="swirl", channels=2, fourier=[], schedule=schedule))
    torch.nn.init.normal_(m.net.out.weight, std=0.1)
    if schedule == "net":  # a visibly curved interior
        torch.nn.init.normal_(m.gamma.l2.weight, std=5.0)
        torch.nn.init.normal_(m.gamma.l2.bias, std=3.0)
        torch.nn.init.uniform_(m.gamma.l3.weight, 0, 0.05)
    return m


def swirl_k(n=256, seed=0):
    """n swirl points as their exact 8-bit values (n, 2)."""
    x = data.load("swirl", "train")[0][:n]
    return vdm.to_int(dict(data="swirl"), x)


# ---- the bound, the schedule and the sampler -------------------------------------------------------
def test_vdm_init_terms_on_uniform_8bit_data():
    torch.manual_seed(0)
    m = vdm.build_model(vdm_args()).eval()
    k = torch.randint(0, 256, (256, 3, 8, 8))
    with torch.no_grad():
        recon, prior, diff = (v.mean().item() for v in m(k))
    assert 0.009 < recon < 0.013                        # ~0.011 bits/dim at gamma_0 = -13.3
    assert abs(prior - 0.0016) < 0.0002                 # ~0.0016 bits/dim at gamma_1 = 5
    assert 10.0 < recon + prior + diff < 11.5           # an untrained model (eps_hat = z) is near 10.8


def test_vdm_discrete_weight_uses_expm1():
    w = vdm.diffusion_weight(torch.tensor(5.0, dtype=torch.float64), torch.tensor(5.0 - 18.3 / 1000, dtype=torch.float64), 1000)
    assert abs(w.item() - 18.47) < 0.005 and abs(w.item() - 18.3) > 0.15


def test_vdm_discrete_loss_approaches_continuous():
    m, k = swirl_model(), swirl_k(1024)
    losses = {}
    with torch.no_grad():
        for T in (10, 100, 1000, 0):
            torch.manual_seed(1)                        # the same u and eps for every T
            losses[T] = m(k, T=T)[2].mean().item()
    gaps = [abs(losses[T] - losses[0]) for T in (10, 100, 1000)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.01 * losses[0]
    assert losses[10] > losses[100] > losses[1000]     # more steps, a tighter bound (Sec. 4.1)


@pytest.mark.parametrize("kind", ["fixed", "scalar", "net"])
def test_vdm_gamma_slope_matches_finite_difference(kind):
    s = swirl_model(kind).gamma.double()
    t = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)
    _, slope, _ = vdm.gamma_and_slope(s, t, create_graph=False)
    h = 1e-5
    with torch.no_grad():
        fd = (s(t + h) - s(t - h)) / (2 * h)
    assert torch.allclose(slope, fd, rtol=1e-6, atol=1e-6)


def test_vdm_net_schedule_endpoints_exact_and_monotone():
    s = swirl_model("net").gamma
    g0, g1 = s.endpoints()
    with torch.no_grad():
        t = torch.linspace(0, 1, 2001)
        gamma = s(t)
        ends = s(torch.tensor([0.37, 1.0, 0.0, 0.61]))
    assert gamma[0] == g0 and gamma[-1] == g1 and ends[2] == g0 and ends[1] == g1
    assert torch.all(gamma[1:] > gamma[:-1])
    lin = g0 + (g1 - g0) * t
    assert (gamma - lin).abs().max() > 0.5              # really curved, yet pinned at both ends


def test_vdm_antithetic_times_lower_variance():
    torch.manual_seed(0)
    m, k = vdm.build_model(vdm_args()).eval(), torch.randint(0, 256, (32, 3, 8, 8))   # a fresh model: eps_hat = z
    est = {True: [], False: []}
    with torch.no_grad():
        for anti in (True, False):
            for _ in range(100):
                est[anti].append(vdm.elbo_terms(m, k, antithetic=anti)[2].mean().item())
    assert np.var(est[True]) < 0.5 * np.var(est[False])


def test_vdm_recon_window_equals_full_softmax():
    torch.manual_seed(0)
    m = vdm.build_model(vdm_args())
    k = torch.randint(0, 256, (8, 3, 8, 8))
    x = m.centres[torch.arange(3).view(1, 3, 1, 1), k]
    for g in (-13.3, -10.0, -7.0, -4.0, 2.0):                  # 2.0: the window spans all 256 bins
        u = x + math.exp(g / 2) * 4 * torch.randn_like(x)
        a = vdm.recon_nll(m, k, u, torch.tensor(g))
        full = -torch.log_softmax(vdm.decoder_logits(m, u, torch.tensor(g)), dim=-1)      # all 256 bins
        b = full.gather(-1, k[..., None]).squeeze(-1)
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-5)


def test_vdm_sampler_step_is_the_posterior_at_x_hat():
    torch.manual_seed(0)
    z_t, eps_hat, noise = torch.randn(3, 1000, dtype=torch.float64)
    gt, gs = torch.tensor(1.3, dtype=torch.float64), torch.tensor(-0.8, dtype=torch.float64)
    a_t2, s_t2, a_s2, s_s2 = torch.sigmoid(-gt), torch.sigmoid(gt), torch.sigmoid(-gs), torch.sigmoid(gs)
    x_hat = (z_t - s_t2.sqrt() * eps_hat) / a_t2.sqrt()
    a_ts2 = a_t2 / a_s2                                 # q(z_t | z_s) = N(alpha_{t|s} z_s, sigma_{t|s}^2)
    s_ts2 = s_t2 - a_ts2 * s_s2
    mean = a_ts2.sqrt() * s_s2 / s_t2 * z_t + a_s2.sqrt() * s_ts2 / s_t2 * x_hat
    var = s_ts2 * s_s2 / s_t2
    z_s = vdm.sample_step(z_t, eps_hat, gt.item(), gs.item(), noise)
    assert torch.allclose(z_s, mean + var.sqrt() * noise, atol=1e-10)


def test_vdm_var_min_changes_only_the_interior_gradient():
    def grads(var_min, square=False):
        m = swirl_model("net")
        torch.manual_seed(2)
        recon, prior, diff = m(swirl_k(128), var_min=var_min)
        loss = (diff ** 2).mean() if square else (recon + prior + diff).mean()
        loss.backward()
        return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in m.named_parameters()}

    elbo, vm, sq = grads(False), grads(True), grads(False, square=True)
    interior = [n for n in elbo if n.startswith(("gamma.l1", "gamma.l2", "gamma.l3"))]
    assert interior and len(interior) < len(elbo)
    for n in elbo:
        if n in interior:
            assert not torch.allclose(vm[n], elbo[n])
            assert (vm[n] - sq[n]).abs().max() <= 1e-5 * sq[n].abs().max()   # = d E[L_diff^2] / d eta
        else:
            assert torch.equal(vm[n], elbo[n]), n       # endpoints and network keep the ELBO gradient


def test_vdm_guidance_zero_is_the_conditional_model():
    torch.manual_seed(0)
    m = vdm.build_model(vdm_args(cond=True)).eval()
    for p in m.net.parameters():                            # undo the zero inits, so the label matters
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    z, g, y = torch.randn(6, 3, 8, 8), torch.full((6,), 2.0), torch.arange(6)
    with torch.no_grad():
        e_c, e_null = vdm.eps_model(m, z, g, y), vdm.eps_model(m, z, g, torch.full_like(y, -1))
        assert torch.equal(vdm.eps_model(m, z, g, y, w=0.0), e_c)
        assert torch.allclose(vdm.eps_model(m, z, g, y, w=1.0), 2 * e_c - e_null, atol=1e-5)
    assert not torch.allclose(e_c, e_null)


# ---- smoke runs and the command line ---------------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["--T", "10", "--schedule", "fixed"], ["--schedule", "net", "--var-min"],
                                   ["--latent"], ["--cond", "--labels", "1", "--guidance", "2"]])
def test_vdm_smoke_images(tmp_path, extra):
    out = str(tmp_path / "run")
    vdm.main(["--steps", "2", "--out", out, *TINY_VDM, *extra])
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["method"] == "vdm" and m["step"] == 2 and math.isfinite(m["test_bpd"])
    assert abs(m["test_bpd"] - m["test_recon"] - m["test_prior"] - m["test_diff"]) < 1e-6
    assert m["nfe"] == (6 if "--cond" in extra else 3) and os.path.exists(os.path.join(out, "samples.png"))


def test_vdm_smoke_swirl(tmp_path):
    out = str(tmp_path / "swirl")
    vdm.main(["--data", "swirl", "--steps", "5", "--hidden", "32", "--layers", "2", "--n-samples", "64",
              "--sample-steps", "4", "--out", out, "--log-every", "1e-9"])
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert "energy" in m and math.isfinite(m["test_bpd"]) and os.path.exists(os.path.join(out, "samples.png"))


def test_vdm_resume_sample_only_and_eval(tmp_path):
    out = str(tmp_path / "r")
    vdm.main(["--steps", "2", "--out", out, *TINY_VDM])
    with pytest.raises(SystemExit) as e:                # an existing run is not overwritten
        vdm.main(["--steps", "2", "--out", out, *TINY_VDM])
    assert e.value.code == 2
    vdm.main(["--steps", "4", "--out", out, "--resume", *TINY_VDM])
    assert json.load(open(os.path.join(out, "metrics.json")))["step"] == 4
    vdm.main(["--sample-only", "--out", out, "--n-samples", "5", "--sample-steps", "2", "--save-npz"])
    arr = np.load(os.path.join(out, "samples_ancestral2.npz"))["arr_0"]
    assert arr.shape == (5, 8, 8, 3) and arr.dtype == np.uint8
    test = vdm.main(["--eval", "--out", out])
    assert set(test) == {"test_bpd", "test_recon", "test_prior", "test_diff"}
    assert json.load(open(os.path.join(out, "metrics_eval.json")))["step"] == 4


@pytest.mark.parametrize("bad", [["--var-min"], ["--T", "-1"], ["--data", "25gaussians"],
                                 ["--data", "swirl", "--latent"], ["--labels", "3"], ["--p-uncond", "1.5"],
                                 ["--sample-only", "--eval"], ["--resume"]])
def test_vdm_bad_flags_exit_2(tmp_path, bad):
    with pytest.raises(SystemExit) as e:
        vdm.main(["--out", str(tmp_path / "none"), *bad])
    assert e.value.code == 2


def test_vdm_cli_rejects_unknown_schedule():
    r = subprocess.run([sys.executable, VDM_PY, "--schedule", "cosine"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--schedule" in r.stderr


# ====================================================================================================
# ddgan.py
# ---- schedule, real pairs, sampler and losses ------------------------------------------------------
def test_ddgan_betas_match_paper_at_T4():
    beta = ddgan.make_schedule(4)["beta"]
    assert torch.allclose(beta.double(), torch.tensor([0.478, 0.849, 0.956, 0.987], dtype=torch.float64), atol=6e-4)


@pytest.mark.parametrize("T", [1, 2, 4, 8])
def test_ddgan_alpha_bar_T_is_4e5_for_every_T(T):
    s = ddgan.make_schedule(T)
    assert torch.all(s["beta"] > 0) and torch.all(s["beta"] < 1)
    assert 3.5e-5 < s["alpha_bar"][-1].item() < 5e-5
    # the convention: alpha_bar_0 = 1 (x_0 is the data), so the last step's posterior is x0 itself
    assert s["alpha_bar_prev"][0].item() == 1.0 and s["beta_tilde"][0].item() == 0.0


def test_ddgan_pairs_follow_the_forward_process():
    """x_{t-1} ~ N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}) and x_t | x_{t-1} ~ N(sqrt(1 - beta_t) x_{t-1}, beta_t)."""
    torch.manual_seed(0)
    s = ddgan.make_schedule(4)
    x0 = torch.full((200_000, 1), 0.6)
    for step in (1, 3):
        t = torch.full((len(x0),), step, dtype=torch.long)
        x_prev, x_t = ddgan.q_sample_pairs(s, x0, t)
        ab_prev, ab = s["alpha_bar_prev"][step - 1].item(), s["alpha_bar"][step - 1].item()
        assert abs(x_prev.mean().item() - math.sqrt(ab_prev) * 0.6) < 0.01
        assert abs(x_prev.var().item() - (1 - ab_prev)) < 0.01
        assert abs(x_t.mean().item() - math.sqrt(ab) * 0.6) < 0.01 and abs(x_t.var().item() - (1 - ab)) < 0.01
    t = torch.ones(4, dtype=torch.long)
    assert torch.equal(ddgan.q_sample_pairs(s, x0[:4], t)[0], x0[:4])     # t = 1: the real x_{t-1} is the data


def test_ddgan_last_step_returns_G_x0_and_sampler_uses_T_calls():
    s = ddgan.make_schedule(4)
    x0, x_t = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    out = ddgan.sample_posterior(s, x0, x_t, torch.ones(5, dtype=torch.long), torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0, atol=1e-6)
    calls, zs = [], []

    def gen(x, t, z):
        calls.append(int(t[0]))
        zs.append(z)
        return torch.tanh(x + z[:, :1, None, None])

    x = ddgan.sample(gen, s, (5, 3, 4, 4), nz=8, generator=torch.Generator().manual_seed(1))
    assert calls == [4, 3, 2, 1] and not torch.equal(zs[0], zs[1])        # NFE = T, a fresh z at every step
    assert x.abs().max() <= 1                                             # the output is G's (tanh) x0 itself


def test_ddgan_losses_equal_bce_with_logits_and_stay_finite():
    for logits in (torch.tensor([-100.0, -3.0, 0.0, 2.5, 100.0]), torch.randn(64) * 30):
        real = logits.clone().requires_grad_(True)
        fake = logits.flip(0).clone().requires_grad_(True)
        ld = ddgan.d_loss(real, fake)
        ref = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
               + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
        assert torch.allclose(ld, ref, rtol=1e-5, atol=1e-5)
        lg = ddgan.g_loss(fake)
        assert torch.allclose(lg, F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake)), rtol=1e-5)
        (ld + lg).backward()
        assert torch.isfinite(ld) and torch.isfinite(lg)
        assert torch.isfinite(real.grad).all() and torch.isfinite(fake.grad).all()
    assert ddgan.d_loss(torch.tensor([100.0]), torch.tensor([-100.0])).item() < 1e-30   # a perfect D: loss ~0, not NaN


def test_ddgan_hinge_losses_closed_form():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 1.0])
    assert torch.isclose(ddgan.d_loss(real, fake, "hinge"), torch.tensor((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3))
    assert torch.isclose(ddgan.g_loss(fake, "hinge"), -fake.mean())
    assert torch.isclose(ddgan.d_loss(real, fake), F.softplus(-real).mean() + F.softplus(fake).mean())


def test_ddgan_r1_is_nonzero_and_differentiable_in_D():
    torch.manual_seed(0)
    D = unet.Discriminator(in_ch=6, ch=16, ch_mult=(1, 2), num_res_blocks=1, image_size=8)
    disc = ddgan.disc_fn(D, 4, "float32")
    x_prev = torch.randn(4, 3, 8, 8, requires_grad=True)
    x_t, t = torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 3, 4])
    r1 = ddgan.r1_penalty(disc(x_prev, x_t, t), x_prev)
    assert torch.isfinite(r1) and r1.item() > 0
    r1.backward()
    # every weight that shapes grad_x D gets a gradient (the head's bias cannot: it does not depend on x)
    grads = {n: p.grad for n, p in D.named_parameters() if n != "head.bias"}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert D.conv_in.weight.grad.abs().sum() > 0 and D.head.weight.grad.abs().sum() > 0


# ---- the training loop, smoke runs and the command line --------------------------------------------
def _small_image_flags(out, steps=3):
    return ["--data", "glyphs", "--ch", "8", "--ch-mult", "1", "2", "--num-res-blocks", "1", "--image-size", "8",
            "--nz", "4", "--batch-size", "8", "--T", "2", "--steps", str(steps), "--sample-every", "2",
            "--ckpt-every", "2", "--n-samples", "4", "--lazy-reg", "2", "--out", out]


def test_ddgan_d_steps_per_g_step(tmp_path, monkeypatch):
    """--d-steps 2: two D updates (each on a fresh draw of t, pair and z) for every G update."""
    calls = []
    for name in ("d_step", "g_step"):
        orig = getattr(ddgan, name)
        monkeypatch.setattr(ddgan, name, lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k))
    ddgan.main(_small_image_flags(str(tmp_path / "ds"), steps=3) + ["--d-steps", "2"])
    assert calls == ["d_step", "d_step", "g_step"] * 3


@pytest.mark.parametrize("share", [True, False])
def test_ddgan_share_fake_draws(tmp_path, monkeypatch, share):
    """--share-fake: the G step reuses the last D step's draw (made with grad), so d_steps draws per iteration;
    --no-share-fake (the paper's): a fresh one for G, d_steps + 1 draws, the G step's made with grad."""
    draws, pairs = [], []
    orig_draw, orig_g = ddgan.draw, ddgan.g_step
    monkeypatch.setattr(ddgan, "draw", lambda *a: draws.append(torch.is_grad_enabled()) or orig_draw(*a))
    monkeypatch.setattr(ddgan, "g_step", lambda disc, G, D, opt, pair, *a: pairs.append(pair[3].requires_grad)
                        or orig_g(disc, G, D, opt, pair, *a))
    flag = "--share-fake" if share else "--no-share-fake"
    ddgan.main(_small_image_flags(str(tmp_path / "sf"), steps=2) + ["--d-steps", "2", flag])
    assert draws == ([False, True] if share else [False, False, True]) * 2
    assert pairs == [True, True]                       # G's gradient flows through the fake it is scored on


def test_ddgan_smoke_2d(tmp_path):
    out = str(tmp_path / "g2d")
    ddgan.main(["--data", "25gaussians", "--hidden", "32", "--layers", "2", "--nz", "4", "--batch-size", "64",
                "--steps", "4", "--sample-every", "2", "--n-samples", "100", "--lazy-reg", "2", "--out", out])
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["method"] == "ddgan" and m["nfe"] == 4 and m["step"] == 4 and "modes" in m and "energy" in m
    assert math.isfinite(m["loss_d"]) and math.isfinite(m["loss_g"])
    for f in ("samples.png", "samples_0000002.png", "ckpt.pt", "log.txt"):
        assert os.path.exists(os.path.join(out, f))
    assert "D(real)" in open(os.path.join(out, "log.txt")).read()


def test_ddgan_smoke_image_no_z(tmp_path):
    out = str(tmp_path / "gimg")
    ddgan.main(_small_image_flags(out) + ["--no-z"])
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["sampler"] == "ddgan_T2_noz" and m["nfe"] == 2 and m["n_samples"] == 4
    assert os.path.exists(os.path.join(out, "samples.png")) and os.path.exists(os.path.join(out, "ckpt.pt"))


def test_ddgan_resume_restores_both_networks_and_optimizers(tmp_path):
    out, paper = str(tmp_path / "res"), ["--disc", "paper", "--d-steps", "1", "--loss", "softplus"]
    ddgan.main(_small_image_flags(out, steps=2) + paper)
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["step"] == 2 and ck["opt_G"]["state"] and ck["opt_D"]["state"]
    with pytest.raises(SystemExit) as e:                                   # no silent overwrite
        ddgan.main(_small_image_flags(out, steps=4) + paper)
    assert e.value.code == 2
    # resume: spy on the first two optimizer steps (D's, then G's) to see what the resumed run started from
    seen = []
    orig = torch.optim.Adam.step

    def spy(self, *a, **k):
        if len(seen) < 2:
            params = [p.detach().clone() for g in self.param_groups for p in g["params"]]
            seen.append((copy.deepcopy(self.state_dict()), params))   # Adam updates its state in place
        return orig(self, *a, **k)

    torch.optim.Adam.step = spy
    try:
        ddgan.main(_small_image_flags(out, steps=4) + paper + ["--resume"])
    finally:
        torch.optim.Adam.step = orig
    for (opt_state, params), net, opt in zip(seen, ("D", "G"), ("opt_D", "opt_G")):
        saved = list(ck[net].values())                                     # no buffers: parameters in order
        assert len(saved) == len(params) and all(torch.equal(p, q) for p, q in zip(params, saved))
        assert opt_state["state"][0]["step"].item() == 2
        assert torch.equal(opt_state["state"][0]["exp_avg"], ck[opt]["state"][0]["exp_avg"])
    ck2 = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck2["step"] == 4
    assert ck2["opt_G"]["state"][0]["step"].item() == 4 and ck2["opt_D"]["state"][0]["step"].item() == 4
    for k in ("G", "D"):                                                   # both networks kept training
        assert any(not torch.equal(ck[k][n], ck2[k][n]) for n in ck[k])
    assert len(open(os.path.join(out, "log.txt")).read().splitlines()) > 4


def test_ddgan_generate_warms_up_once_untimed_and_stays_seeded():
    a = dict(data="25gaussians", T=3, beta_min=0.1, beta_max=20.0, nz=4, no_z=False)
    torch.manual_seed(0)
    G = unet.MLP(in_dim=2, hidden=16, layers=1, z_dim=4, zero_out=False)
    calls = []
    G.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    info = {}
    x1 = ddgan.generate(G, a, 7, seed=3, batch=5, info=info)
    assert info["nfe"] == 3 and info["sampler"] == "ddgan_T3" and x1.shape == (7, 2)
    assert calls == [5] + [5] * 3 + [2] * 3            # one warm-up call at the first batch's size, then T per batch
    torch.manual_seed(123)                                # the warm-up must not draw from the seeded noise
    x2 = ddgan.generate(G, a, 7, seed=3, batch=5)
    assert torch.equal(x1, x2)


def test_ddgan_sample_only_npz_and_cli_errors(tmp_path):
    out = str(tmp_path / "so")
    ddgan.main(_small_image_flags(out, steps=2))
    r = run_cli("ddgan.py", "--sample-only", "--out", out, "--n-samples", "6", "--save-npz")
    assert r.returncode == 0, r.stderr
    arr = np.load(os.path.join(out, "samples_ddgan_T2.npz"))["arr_0"]
    assert arr.shape == (6, 8, 8, 3) and arr.dtype == np.uint8
    assert json.load(open(os.path.join(out, "metrics_ddgan_T2.json")))["nfe"] == 2
    for bad in (["--T", "0"], ["--data", "no_such_set"], ["--steps", "0"]):
        r = run_cli("ddgan.py", *bad, "--out", str(tmp_path / "bad"))
        assert r.returncode == 2 and "error" in r.stderr, (bad, r.stderr)
    r = run_cli("ddgan.py", "--sample-only", "--out", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no checkpoint" in r.stderr


# ====================================================================================================
# shortcut_mcmc.py
TINY_2D = ["--hidden", 32, "--layers", 2, "--batch-size", 64, "--T", 20, "--K", 3, "--n-samples", 64,
           "--subsets", 2, "--eval-seeds", 1]


def toy_model(seed=0):
    """A small 2-D ShortcutVDM whose zero-initialised output layer is perturbed (as after a training step)."""
    torch.manual_seed(seed)
    model = sm.ShortcutVDM(unet.MLP(in_dim=2, hidden=32, layers=2), torch.full((2,), -3.0), torch.full((2,), 3.0),
                           torch.full((2,), 0.02))
    torch.nn.init.normal_(model.net.out.weight, std=0.3)
    return model


CFG = dict(T=20, K=4, renoise="eps_hat", clip=True, fidelity="l2", fid_batch=64, dtype="float32")


# ---- the chain and the losses ----------------------------------------------------------------------
@pytest.mark.parametrize("fidelity", ["l2", "energy"])
@pytest.mark.parametrize("renoise", ["forward", "eps_hat", "fresh"])
def test_shortcut_fidelity_loss_alone_trains_every_network_parameter(fidelity, renoise):
    model = toy_model()
    x0 = torch.randn(64, 2)
    fid = model(x0, dict(CFG, fidelity=fidelity, renoise=renoise), True)[3]
    assert torch.isfinite(fid) and fid > 0
    fid.backward()
    for name, p in model.net.named_parameters():                          # the fidelity term reaches every weight
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.b.grad is None and model.w.grad is None                # schedule detached inside the chain


def test_shortcut_each_iteration_draws_new_times(monkeypatch):
    drawn, real = [], sm.chain_times
    monkeypatch.setattr(sm, "chain_times", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    model, x0 = toy_model(), torch.randn(16, 2)
    torch.manual_seed(1)
    for _ in range(2):
        model(x0, CFG, True)
    assert len(drawn) == 2 and drawn[0] != drawn[1]
    for n in drawn:                                                     # t = 1 first, then K distinct, descending
        assert n[0] == 20 and len(set(n[1:])) == 4 and n == sorted(n, reverse=True) and 1 <= min(n) and n[1] < 20
    assert model(x0, CFG, False)[3].item() == 0 and len(drawn) == 2     # no chain without the fidelity term


def test_shortcut_chain_eps_hat_equals_ddim_eta0():
    """--renoise eps_hat: each jump is DDIM's eta = 0 update (Song et al. Eq. 12) written with
    alpha_bar = sigmoid(-gamma), computed here independently in float64."""
    model, T, times = toy_model(), 20, [20, 13, 7, 2]
    z1 = torch.randn(5, 2)
    with torch.no_grad():
        got = sm.run_chain(model, z1, times, T, "eps_hat", clip=False)
        b, w = model.b.double(), model.w.abs().double()
        x = z1.double()
        for i, n in enumerate(times):
            ab = torch.sigmoid(-(b + w * n / T))
            eps = model.net(x.float(), torch.full((5,), 1000 * ((b + w * n / T).item() + 13.3) / 18.3)).double()
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            if i + 1 < len(times):
                ab_prev = torch.sigmoid(-(b + w * times[i + 1] / T))
                x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    assert torch.allclose(got.double(), x0, atol=1e-4)
    # the other modes differ: forward reuses z_1 as the noise, fresh draws new noise
    assert not torch.allclose(sm.run_chain(model, z1, times, T, "forward", clip=False).detach(), got, atol=1e-4)


def test_shortcut_full_chain_visits_every_grid_time():
    T = 12
    assert sm.chain_times(T, T - 1, "random") == list(range(T, 0, -1))
    assert sm.chain_times(T, T - 1, "even") == list(range(T, 0, -1))
    assert sm.chain_times(200, 10, "even")[:2] == [200, 180] and sm.chain_times(200, 10, "even")[-1] == 1
    model, seen = toy_model(), []
    real = model.eps_hat
    model.eps_hat = lambda z, g, dtype="float32": seen.append(g[0].item()) or real(z, g, dtype)
    sm.run_chain(model, torch.randn(3, 2), sm.chain_times(T, T - 1), T, "fresh")
    want = model.gamma(torch.arange(T, 0, -1) / T).tolist()
    assert len(seen) == T and np.allclose(seen, want, atol=1e-5)
    with pytest.raises(ValueError):
        sm.chain_times(T, T)


def test_shortcut_samplers_finite_and_in_the_box():
    model = toy_model()
    g = torch.Generator().manual_seed(0)
    a = sm.sample_ancestral(model, (50, 2), 20, clip=True, generator=g)
    c = sm.sample_chain(model, (50, 2), [20, 10, 3], 20, "fresh", generator=g)
    for x in (a, c):
        assert torch.isfinite(x).all() and x.abs().max() <= 3.0


@pytest.mark.parametrize("data_name", ["glyphs", "swirl"])
def test_shortcut_recon_bins_hold_all_the_mass(data_name):
    """DDPM Eq. 13: for any decoder mean u, p(k | z_0) over the 256 bins sums to 1, because bins 0 and 255 reach
    -inf and +inf (integrating each bin over its own width alone loses the tails beyond the two edges)."""
    a = dict(data=data_name, channels=1, hidden=8, layers=1, box=[[-3.0, -3.0], [3.0, 3.0]], ch=8, ch_mult=[1],
             num_res_blocks=1, attn_res=[], dropout=0.0, temb_dim=None, image_size=8)
    model = sm.build_model(a)
    grid = data.swirl_grid()[0] if data_name == "swirl" else torch.arange(256.0) / 127.5 - 1   # bin values, axis 0
    for g0 in (-13.3, -6.0, -2.0):
        std = math.exp(g0 / 2)
        for u in (grid[0] - 3 * std, grid[0] + 0.3 * (grid[1] - grid[0]), grid[100], grid[255] + 5 * std):
            x = grid[:, None].expand(256, 2) if data_name == "swirl" else grid.view(256, 1, 1, 1)
            nll = sm.recon_nll(model, x, (u - x) / std, torch.tensor(g0))
            total = torch.exp(-nll.flatten(1)[:, 0]).sum().item()
            assert abs(total - 1) < 1e-5, (g0, u)


def test_shortcut_energy_distance_is_per_dimension():
    """The fidelity variant's energy distance between N(0, I) and N(0.5, I) is about the same at D = 2 and D = 256,
    so --lambda-fid means the same on 2-D points and on images (unnormalised it would be ~11x larger at 256)."""
    g = torch.Generator().manual_seed(0)
    ed = {D: sm.energy_distance(torch.randn(2000, D, generator=g), torch.randn(2000, D, generator=g) + 0.5).item()
          for D in (2, 256)}
    assert 0.12 < ed[2] < 0.19 and 0.14 < ed[256] < 0.2 and 0.7 < ed[2] / ed[256] < 1.3
    same = sm.energy_distance(torch.randn(2000, 256, generator=g), torch.randn(2000, 256, generator=g)).item()
    assert abs(same) < 0.01


# ---- smoke runs and the command line ---------------------------------------------------------------
def test_shortcut_2d_train_resume_sample_only(tmp_path, capsys):
    out = tmp_path / "swirl"
    assert main_exit(sm.main, [*TINY_2D, "--steps", 4, "--fid-start", 2, "--out", out]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "shortcut_mcmc" and m["nfe"] == 4 and m["step"] == 4 and m["sec_per_100"] > 0
    assert {"energy", "energy_floor", "energy_std", "fid", "sampler", "n_samples", "loss"} <= set(m) and m["runs"] == 2
    assert m["fid"] > 0 and (out / "samples.png").is_file()
    # a second run into the same folder must not overwrite the checkpoint; --resume continues 4 -> 6
    assert main_exit(sm.main, [*TINY_2D, "--steps", 4, "--out", out]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main_exit(sm.main, [*TINY_2D, "--steps", 6, "--out", out, "--resume"]) == 0
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 6 and "steps 4..6" in capsys.readouterr().out
    # --sample-only needs no training flags
    assert main_exit(sm.main, ["--sample-only", "--out", out, "--K", 5, "--times", "even", "--n-samples", 30,
                               "--save-npz"]) == 0
    assert np.load(out / "samples_chain5_even_eps_hat.npz")["arr_0"].shape == (30, 2)
    assert json.loads((out / "metrics_chain5_even_eps_hat.json").read_text())["nfe"] == 6
    assert main_exit(sm.main, ["--sample-only", "--out", out, "--times", "ancestral", "--n-samples", 30]) == 0
    assert json.loads((out / "metrics_ancestral20.json").read_text())["nfe"] == 20
    assert main_exit(sm.main, ["--sample-only", "--out", out, "--K", 20]) == 2
    assert "T-1 = 19" in capsys.readouterr().err


def test_shortcut_images_smoke_and_npz(tmp_path, tiny_folder):
    out = tmp_path / "img"
    assert main_exit(sm.main, ["--data", tiny_folder, *TINY_UNET, "--T", 10, "--K", 2, "--steps", 2, "--fid-start", 1,
                               "--fid-batch", 4, "--n-samples", 4, "--dtype", "bfloat16", "--out", out]) == 0
    assert json.loads((out / "metrics.json").read_text())["nfe"] == 3 and (out / "samples.png").is_file()
    assert main_exit(sm.main, ["--sample-only", "--out", out, "--K", 3, "--n-samples", 4, "--save-npz"]) == 0
    arr = np.load(out / "samples_chain3_random_eps_hat.npz")["arr_0"]
    assert arr.shape == (4, 8, 8, 3) and arr.dtype == np.uint8


def test_shortcut_compare_prints_table_and_picture(tmp_path, capsys):
    assert main_exit(sm.main, [*TINY_2D, "--steps", 3, "--fid-start", 1, "--compare", "--out", tmp_path]) == 0
    text = capsys.readouterr().out
    assert "| baseline | K=3 random, eps_hat | 4 |" in text and "| shortcut | ancestral 20 | 20 |" in text
    assert "| shortcut | K=3 random, forward | 4 |" in text and "| baseline | all 20 grid times, eps_hat | 20 |" in text
    assert Image.open(tmp_path / "compare.png").size[0] > 1600            # four panels side by side
    assert (tmp_path / "baseline" / "ckpt.pt").is_file() and (tmp_path / "shortcut" / "metrics.json").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--K", "0"], "--K must be between 1 and T-1"),
    (["--T", "20", "--K", "20"], "--K must be between 1 and T-1"),
    (["--data", "25gaussians"], "needs the 8-bit swirl"),
    (["--data", "nosuchdata"], "unknown dataset"),
    (["--lambda-fid", "-1"], "--lambda-fid"),
    (["--fid-every", "0"], "--fid-every"),
    (["--renoise", "ddpm"], "invalid choice"),
    (["--k", "3"], "unrecognized"),
])
def test_shortcut_bad_flags_exit_2(tmp_path, flags, message, capsys):
    assert main_exit(sm.main, [*flags, "--steps", 1, "--out", tmp_path / "bad"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad" / "ckpt.pt").exists()


def test_shortcut_bad_flag_from_the_shell(tmp_path):
    r = run_cli("shortcut_mcmc.py", "--K", 0, "--out", tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("--K must be between 1 and T-1 = 199")


def test_shortcut_bad_checkpoints(tmp_path, capsys):
    assert main_exit(sm.main, ["--sample-only", "--out", tmp_path / "missing"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    torch.save({"method": "ddpm", "step": 1}, tmp_path / "other" / "ckpt.pt")
    assert main_exit(sm.main, ["--sample-only", "--out", tmp_path / "other"]) == 2
    assert "not a shortcut_mcmc checkpoint" in capsys.readouterr().err


def test_shortcut_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "nan"
    assert main_exit(sm.main, [*TINY_2D, "--steps", 2, "--out", out]) == 0
    before = (out / "ckpt.pt").read_bytes()
    nan = torch.tensor(float("nan"), requires_grad=True) * 1
    monkeypatch.setattr(sm, "losses", lambda *a, **k: (nan, nan * 0, nan * 0, nan * 0))
    assert main_exit(sm.main, [*TINY_2D, "--steps", 4, "--out", out, "--resume"]) == 1
    assert (out / "ckpt.pt").read_bytes() == before


# ====================================================================================================
# trilemma.py end to end
def test_trilemma_table_end_to_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "tri"
    argv = ["--data", "25gaussians", "--methods", "ddpm", "ddgan", "--steps", "20", "--n-samples", "200",
            "--hidden", "32", "--layers", "1", "--batch-size", "64", "--out", str(out), "--device", "cpu"]
    assert trilemma.main(argv) == 0
    md = (out / "table.md").read_text()
    assert "| method | sampler | NFE | s / 100 samples | quality | coverage |" in md
    res = json.loads((out / "results.json").read_text())
    by = {(r["method"], r["nfe"]) for r in res["rows"]}
    assert by == {("ddpm", 1000), ("ddpm", 50), ("ddgan", 4)}           # T = 1000, DDIM 50, DDGAN T = 4
    assert all(r["sec_per_100"] > 0 and 0 <= r["modes"] <= 25 for r in res["rows"])
    assert "/25 modes" in md and "real data" in md
    img = np.asarray(Image.open(out / "trilemma.png"))
    assert img.shape[1] == 4 * 400 + 3 * 10                            # real + three samplers side by side
    # a second run into the same folder is refused without --reuse; with it, nothing is trained again
    with pytest.raises(SystemExit) as e:
        trilemma.main(argv)
    assert e.value.code == 2
    capsys.readouterr()
    monkeypatch.setattr(trilemma, "sample", lambda a, method, out: ([], []))   # only the training step is checked
    assert trilemma.main(argv + ["--reuse", "--methods", "ddgan"]) == 0
    printed = capsys.readouterr().out
    assert "reusing" in printed and "training took" not in printed


def test_trilemma_sweep_rows_parse():
    """Every --sweep row's flags are flags its script accepts, for training and for --sample-only."""
    scripts = {"ddpm.py": ddpm, "vdm.py": vdm}
    for rows in trilemma.SWEEPS.values():
        for label, script, train_flags, sample_flags in rows:
            scripts[script].get_parser().parse_args(train_flags)
            scripts[script].get_parser().parse_args(["--sample-only", *sample_flags])


def test_trilemma_reuse_compares_every_value_of_a_flag():
    """--reuse compares flags with several values (--ch-mult 1 2 4) value by value, and the steps trained."""
    a = argparse.Namespace(data="cifar10", image_size=16, classes=["airplane"])
    args = dict(data="cifar10", image_size=16, classes=["airplane"], ch=64, ch_mult=[1, 2, 4], temb_dim=32, T=1000,
                steps=30)
    flags = trilemma.REPORT_UNET + ["--T", "1000", "--steps", "30"]
    assert trilemma.flag_values(flags)["ch-mult"] == ["1", "2", "4"]
    assert trilemma.reuse_mismatch(a, "ddpm.py", flags, dict(method="ddpm", step=30, args=args)) is None
    other = ["--ch", "64", "--ch-mult", "1", "2", "--temb-dim", "32", "--T", "1000", "--steps", "30"]
    assert "ch-mult" in trilemma.reuse_mismatch(a, "ddpm.py", other, dict(method="ddpm", step=30, args=args))
    assert "stopped at step 20" in trilemma.reuse_mismatch(a, "ddpm.py", flags, dict(method="ddpm", step=20, args=args))
    assert "not ddpm.py" in trilemma.reuse_mismatch(a, "ddpm.py", flags, dict(method="vdm", step=30, args=args))


def test_trilemma_sweep_rows_share_models(tmp_path, monkeypatch, capsys):
    """--sweep: a row per setting, rows with the same training flags read one model, the picture has a strip per
    row under the real one; a second run needs --reuse, which reuses only the models this command would train."""
    monkeypatch.setitem(trilemma.SWEEPS, "ddpm-T", [
        ("linear T=5", "ddpm.py", ["--schedule", "linear", "--T", "5"], []),
        ("vp T=6", "ddpm.py", ["--T", "6"], []),
        ("vp T=6, DDIM S=2", "ddpm.py", ["--T", "6"], ["--sample-steps", "2"])])
    out = tmp_path / "sweep"
    argv = ["--sweep", "ddpm-T", "--steps", "2", "--ch", "8", "--ch-mult", "1", "--num-res-blocks", "1",
            "--image-size", "8", "--batch-size", "8", "--n-samples", "10", "--out", str(out), "--device", "cpu"]
    assert trilemma.main(argv) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["T-6", "schedule-linear-T-5"]   # 2 models, 3 rows
    res = json.loads((out / "results.json").read_text())
    assert [(r["setting"], r["nfe"], r["step"]) for r in res["rows"]] == [("linear T=5", 5, 2), ("vp T=6", 6, 2),
                                                                         ("vp T=6, DDIM S=2", 2, 2)]
    assert all(r["peak_mem_mb"] > 0 and r["sec_per_100"] > 0 and "fd" in r and "legible" in r for r in res["rows"])
    md = (out / "table.md").read_text()
    assert "| setting | steps | NFE | s / 100 samples | peak memory (MiB) | quality | coverage |" in md
    assert "| vp T=6, DDIM S=2 | 2 | 2 |" in md and "floor" in md
    strip = 8 * 4 + 2 * 4                                                # one row of 8x8 images, x4, 1-px borders
    assert np.asarray(Image.open(out / "sweep.png")).shape[0] == 4 * (strip + 4)     # real + 3 rows
    with pytest.raises(SystemExit) as e:                                 # the models exist: --reuse or another --out
        trilemma.main(argv)
    assert e.value.code == 2
    capsys.readouterr()
    monkeypatch.setitem(trilemma.SWEEPS, "ddpm-T", trilemma.SWEEPS["ddpm-T"][1:2])
    assert trilemma.main(argv + ["--reuse"]) == 0                       # the same flags: sampled again, not trained
    printed = capsys.readouterr().out
    assert "reusing" in printed and "training took" not in printed
    assert trilemma.main([*argv, "--steps", "3", "--reuse"]) == 1       # other steps: refused, nothing trained
    assert "not reused" in (out / "table.md").read_text() and "has other steps" in capsys.readouterr().out
    for bad in (["--data", "swirl"], ["--quick"], ["--methods", "ddpm"]):
        with pytest.raises(SystemExit) as e:
            trilemma.main(["--sweep", "ddpm-T", *bad, "--out", str(tmp_path / "bad")])
        assert e.value.code == 2 and not (tmp_path / "bad").exists()


def test_trilemma_bad_flags_exit_2(tmp_path, capsys):
    for argv in (["--data", "imagenet"], ["--data", "glyphs", "--classes", "cat"], ["--steps", "0"],
                 ["--methods", "gan"], ["--sweep", "ddpm"]):
        with pytest.raises(SystemExit) as e:
            trilemma.main(argv + ["--out", str(tmp_path / "x")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("trilemma.py: error: ") and err.count("\n") == 1         # one line, no usage block
    assert not (tmp_path / "x").exists()                                # nothing written


def test_trilemma_skips_a_missing_method_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(trilemma.METHODS, "shortcut", ("no_such_method.py", [("K10", [])]))
    assert trilemma.main(["--data", "25gaussians", "--methods", "shortcut", "--n-samples", "50",
                          "--out", str(tmp_path)]) == 1                  # no method ran: exit 1, the table says why
    assert "no_such_method.py is missing" in capsys.readouterr().out
    assert "no_such_method.py is missing" in (tmp_path / "table.md").read_text()


# ====================================================================================================
# The run plumbing every method shares (data.py), tried through each script: torchrun with two CPU
# processes, bad input is one line and exit 2 with nothing touched, a diverged update never reaches ckpt.pt,
# --resume continues bit-exactly, --sample-only needs only the checkpoint, kill -9 never leaves a torn
# checkpoint, and long samplers print progress. Parametrize ids name the method, so -k ddgan selects them.
@pytest.mark.parametrize("script, extra", [("ddpm.py", ["--T", "10"]), ("vdm.py", ["--sample-steps", "3"]),
                                           ("ddgan.py", ["--T", "2", "--nz", "4", "--lazy-reg", "1"]),
                                           ("shortcut_mcmc.py", ["--fid-start", "1"])],
                         ids=["ddpm", "vdm", "ddgan", "shortcut_mcmc"])
def test_plumbing_torchrun_two_cpu_processes(tmp_path, tiny_folder, script, extra):
    """Every method trains under torchrun (gloo): 2 ranks, rank 0 alone logs, samples and saves."""
    data_flags = TINY_2D if script == "shortcut_mcmc.py" else ["--data", tiny_folder, *TINY_UNET, "--n-samples", 2]
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, script), *map(str, data_flags), *extra, "--steps", "3", "--device", "cpu",
                        "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "x2" in r.stdout and (out / "ckpt.pt").is_file()
    assert r.stdout.count("done |") == 1                                # only rank 0 samples and logs


SCRIPTS = {"ddpm": ddpm.main, "vdm": vdm.main, "ddgan": ddgan.main, "shortcut_mcmc": sm.main}
TRAIN_FLAGS = {  # a tiny image run of each script, a couple of seconds
    "ddpm": [*TINY_UNET, "--T", 10],
    "vdm": [*TINY_UNET, "--sample-steps", 3],
    "ddgan": [*TINY_UNET, "--T", 2, "--nz", 4],
    "shortcut_mcmc": [*TINY_UNET, "--T", 10, "--K", 2, "--eval-seeds", 1, "--subsets", 1, "--fid-start", 1,
                      "--fid-batch", 4],
}


def _train_argv(script, folder, out, steps=2, extra=()):
    return ["--data", folder, *TRAIN_FLAGS[script], "--steps", steps, "--n-samples", 4, "--sample-every", 0,
            "--out", out, *extra]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_folder):
    """One tiny trained run folder per script (ckpt.pt, log.txt, samples.png, metrics.json)."""
    root = tmp_path_factory.mktemp("trained")
    for script, main in SCRIPTS.items():
        assert main_exit(main, _train_argv(script, tiny_folder, root / script)) == 0
    return root


def _snapshot(folder):
    """Every file under folder -> its bytes (None when the folder does not exist)."""
    if not os.path.exists(folder):
        return None
    if os.path.isfile(folder):
        return open(folder, "rb").read()
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def _edit_ckpt(path, change):
    ck = torch.load(path, weights_only=True)
    change(ck)
    torch.save(ck, path)


def _wrong_shape(states):
    name = next(k for k, v in states.items() if v.dim() == 4)
    states[name] = torch.cat([states[name], states[name]], 0)


def _fault(name, script, tmp, trained, tiny):
    """(argv, out folder) for one bad input; the folder holds what the command must leave untouched."""
    out, run = tmp / "out", lambda *extra, steps=2: _train_argv(script, tiny, tmp / "out", steps, extra)
    state = "ema"                                                  # every script samples from its EMA weights
    other = "ddpm" if script != "ddpm" else "vdm"
    if name.endswith(("truncated", "bytes", "method", "key", "shape", "args")) or name in (
            "overwrite", "n-samples-0", "n-samples-neg"):
        shutil.copytree(trained / script, out)
    ckpt = out / "ckpt.pt"
    if name.endswith("truncated"):
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    if name.endswith("bytes"):
        ckpt.write_bytes(np.random.default_rng(0).bytes(5000))
    if name.endswith("method"):
        shutil.copy(trained / other / "ckpt.pt", ckpt)
    if name.endswith("key"):
        _edit_ckpt(ckpt, lambda ck: ck.pop(state))
    if name.endswith("shape"):
        _edit_ckpt(ckpt, lambda ck: _wrong_shape(ck[state]))
    if name.endswith("args"):
        _edit_ckpt(ckpt, lambda ck: ck["args"].pop("channels"))
    sample = ["--sample-only", "--out", out, "--n-samples", 4]
    if name.startswith("resume-"):
        return run("--resume", steps=4)
    if name.startswith("sample-"):
        return sample
    folder = tmp / "folder"
    if name in ("corrupt-image", "non-image-file"):
        shutil.copytree(tiny, folder)
        (folder / "red" / "broken.png").write_bytes(b"not a png" if name == "corrupt-image" else b"\x00" * 64)
        return ["--data", folder, *_train_argv(script, tiny, out)[2:]]
    if name in ("out-is-file", "out-under-file"):
        (tmp / "file").write_text("keep me")
        target = tmp / "file" if name == "out-is-file" else tmp / "file" / "sub"
        return _train_argv(script, tiny, target)
    table = {
        "overwrite": run(), "n-samples-0": sample[:-1] + [0], "n-samples-neg": sample[:-1] + [-5],
        "lr-nan": run("--lr", "nan"), "lr-negative": run("--lr", -1e-3), "lr-zero": run("--lr", 0),
        "image-size-0": run("--image-size", 0), "image-size-neg": run("--image-size", -4),
        "device-cuda": run("--device", "cuda"), "device-mps": run("--device", "mps"),
        "steps-0": run(steps=0), "batch-0": run("--batch-size", 0), "ckpt-every-0": run("--ckpt-every", 0),
        "unknown-data": ["--data", "no_such_set", "--out", out], "unknown-flag": run("--no-such-flag"),
        "bad-choice": run("--device", "tpu"), "not-a-number": run("--steps", "many"),
        "T-0": run("--T", 1 if script == "shortcut_mcmc" else -1 if script == "vdm" else 0),
        "unknown-class": run("--classes", "purple"), "log-every-neg": run("--log-every", -1),
        "ema-1.5": run("--ema", 1.5), "grad-clip-neg": run("--grad-clip", -1),
        "sample-every-neg": run("--sample-every", -1), "warmup-neg": run("--warmup", -5),
    }
    return table[name]


FAULTS = ["resume-missing", "resume-truncated", "resume-random-bytes", "resume-other-method", "resume-lacks-key",
          "resume-wrong-shape", "resume-lacks-args", "sample-missing", "sample-truncated", "sample-random-bytes",
          "sample-other-method", "sample-lacks-key", "sample-wrong-shape", "sample-lacks-args", "overwrite",
          "n-samples-0", "n-samples-neg", "lr-nan", "lr-negative", "lr-zero", "image-size-0", "image-size-neg",
          "out-is-file", "out-under-file", "device-cuda", "device-mps", "steps-0", "batch-0", "ckpt-every-0",
          "unknown-data", "unknown-flag", "bad-choice", "not-a-number", "T-0", "unknown-class", "log-every-neg",
          "ema-1.5", "grad-clip-neg", "sample-every-neg", "warmup-neg", "corrupt-image", "non-image-file"]


@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize("fault", FAULTS)
def test_plumbing_fault_table(fault, script, tmp_path, trained, tiny_folder, capsys):
    """Each bad input: exit code 2, one line on stderr (no traceback), every file in --out byte-identical."""
    if fault == "device-cuda" and torch.cuda.is_available() or fault == "device-mps" and torch.backends.mps.is_available():
        pytest.skip("the device exists here")
    argv = _fault(fault, script, tmp_path, trained, tiny_folder)
    before = {p: _snapshot(tmp_path / p) for p in ("out", "file")}
    capsys.readouterr()
    code = main_exit(SCRIPTS[script], argv)
    err = capsys.readouterr().err
    assert code == 2, (fault, code, err)
    lines = [s for s in err.splitlines() if s.strip()]
    assert len(lines) == 1 and "Traceback" not in err and "error" in lines[0], err
    assert {p: _snapshot(tmp_path / p) for p in ("out", "file")} == before


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_plumbing_diverged_update_never_reaches_the_checkpoint(script, tmp_path, trained, tiny_folder, capsys):
    out = tmp_path / "out"
    shutil.copytree(trained / script, out)
    before = (out / "ckpt.pt").read_bytes()
    capsys.readouterr()
    code = main_exit(SCRIPTS[script], _train_argv(script, tiny_folder, out, 6, ["--resume", "--lr", 1e6,
                                                                               "--ckpt-every", 1]))
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "diverged" in err and "kept" in err, err
    assert (out / "ckpt.pt").read_bytes() == before
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for k in ("ema",) for v in ck[k].values() if v.is_floating_point())
    # a blow-up before the first save says that no checkpoint was written, and writes none
    fresh = tmp_path / "fresh"
    assert main_exit(SCRIPTS[script], _train_argv(script, tiny_folder, fresh, 6, ["--lr", 1e6])) == 1
    assert "no checkpoint was written" in capsys.readouterr().err and not (fresh / "ckpt.pt").exists()


RESUME_FLAGS = {  # constant lr; images with flips and dropout for ddpm, so data order, flips and RNG all matter
    "ddpm": ["--lr-schedule", "constant", "--flip", "--dropout", 0.1, "--batch-size", 6],
    "vdm": ["--lr-schedule", "constant", "--batch-size", 6],
    "ddgan": ["--lr-schedule", "constant", "--lazy-reg", 2, "--r1-gamma", 0.1, "--batch-size", 6],
    "shortcut_mcmc": ["--lr-schedule", "constant", "--batch-size", 6],
}


MODULES = {"ddpm": ddpm, "vdm": vdm, "ddgan": ddgan, "shortcut_mcmc": sm}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_plumbing_python_load_and_generate(script, trained):
    """The README's Python use: model, cfg = m.load(ckpt); x = m.generate(model, cfg, n, seed): EMA weights in eval
    mode, the run's settings, n images in [-1, 1] of the run's shape, the same for the same seed, not for another."""
    mod = MODULES[script]
    model, cfg = mod.load(str(trained / script / "ckpt.pt"))
    assert not model.training and cfg["step"] == 2 and cfg["image_size"] == 8
    x, again, other = (mod.generate(model, cfg, n=3, seed=s) for s in (0, 0, 1))
    assert x.shape == (3, cfg["channels"], 8, 8) and torch.isfinite(x).all() and x.abs().max() <= 1
    assert torch.equal(x, again) and not torch.equal(x, other)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_plumbing_resume_is_bit_exact(script, tmp_path, tiny_folder):
    """train to 6 == train to 3, stop, --resume to 6: every parameter and EMA weight identical (max |diff| = 0)."""
    main = SCRIPTS[script]
    assert main_exit(main, _train_argv(script, tiny_folder, tmp_path / "full", 6, RESUME_FLAGS[script])) == 0
    assert main_exit(main, _train_argv(script, tiny_folder, tmp_path / "half", 3, RESUME_FLAGS[script])) == 0
    assert main_exit(main, _train_argv(script, tiny_folder, tmp_path / "half", 6,
                                       RESUME_FLAGS[script] + ["--resume"])) == 0
    full, half = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("full", "half"))
    assert full["step"] == half["step"] == 6
    nets = [k for k in full if k in ("model", "ema", "G", "D")]
    for k in nets:
        diff = max((full[k][n].double() - half[k][n].double()).abs().max().item() for n in full[k])
        assert diff == 0, (k, diff)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_plumbing_sample_only_needs_only_the_checkpoint(script, tmp_path, tiny_folder, capsys):
    """--sample-only after the training data is gone: samples and metrics are written, the scores that need the
    real data are skipped with one note."""
    folder, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(tiny_folder, folder)
    assert main_exit(SCRIPTS[script], _train_argv(script, folder, out)) == 0
    shutil.rmtree(folder)
    data._load.cache_clear()                                      # as in a new process: nothing cached in memory
    data.classifier.cache_clear()
    capsys.readouterr()
    extra = ["--K", 2] if script == "shortcut_mcmc" else []
    assert main_exit(SCRIPTS[script], ["--sample-only", "--out", out, "--n-samples", 4, "--save-npz", *extra]) == 0
    assert "scores skipped" in capsys.readouterr().err
    files = os.listdir(out)
    assert any(f.startswith("samples_") and f.endswith(".png") for f in files)
    assert any(f.startswith("samples_") and f.endswith(".npz") for f in files)
    metrics = [json.load(open(out / f)) for f in files if f.startswith("metrics_")]
    assert metrics and "legible" not in metrics[0] and metrics[0]["n_samples"] == 4


def test_plumbing_kill_9_during_ddpm_training_never_leaves_a_torn_checkpoint(tmp_path):
    """kill -9 a training run at random moments: ckpt.pt always loads, and --resume continues from its step."""
    out = tmp_path / "run"
    argv = [sys.executable, os.path.join(HERE, "ddpm.py"), "--data", "25gaussians", "--hidden", 64, "--T", 50,
            "--steps", 100000, "--ckpt-every", 1, "--sample-every", 0, "--n-samples", 50, "--out", out]
    rng, steps = random.Random(0), []
    for k in range(3):
        p = subprocess.Popen([str(a) for a in argv + (["--resume"] if k else [])], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        started, deadline = time.time(), time.time() + 120
        while time.time() < deadline and not ((out / "ckpt.pt").exists() and os.path.getmtime(out / "ckpt.pt") > started):
            time.sleep(0.05)                                  # until this process has written a checkpoint
        time.sleep(rng.random() * 1.5)
        p.kill()
        p.wait()
        ck = torch.load(out / "ckpt.pt", weights_only=True)
        steps.append(ck["step"])
        assert ck["method"] == "ddpm" and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert steps == sorted(steps) and steps[-1] > steps[0]
    r = run_cli("ddpm.py", "--data", "25gaussians", "--hidden", 64, "--T", 50, "--steps", steps[-1] + 3,
                "--ckpt-every", 1, "--sample-every", 0, "--n-samples", 50, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert f"steps {steps[-1]}..{steps[-1] + 3}" in r.stdout
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == steps[-1] + 3


def test_plumbing_ddpm_vdm_shortcut_samplers_print_progress_and_keep_their_numbers(monkeypatch, capsys):
    """Every many-step sampler prints a progress line every few seconds (here a fake clock that ticks 1 s per
    reading), with steps done, rate and ETA; printing changes no sample: the same seed gives the same numbers."""
    T, sched, sm_model, vdm_model = 40, ddpm.make_schedule(40), toy_model(), swirl_model()

    def g():
        return torch.Generator().manual_seed(0)
    runs = {"ddpm ancestral": lambda: ddpm.sample_ancestral(toy_eps(T), sched, (3, 2), generator=g()),
            "ddpm ddim": lambda: ddpm.sample_ddim(toy_eps(T), sched, (3, 2), S=T, eta=0.5, generator=g()),
            "vdm": lambda: vdm.sample(vdm_model, (3, 2), T, generator=g()),
            "shortcut ancestral": lambda: sm.sample_ancestral(sm_model, (3, 2), T, generator=g()),
            "shortcut chain": lambda: sm.sample_chain(sm_model, (3, 2), sm.chain_times(T, T - 1), T, "fresh",
                                                      generator=g())}
    quiet = {k: run() for k, run in runs.items()}
    assert "sampling:" not in capsys.readouterr().out                 # a real clock: short runs print nothing
    clock = iter(range(10 ** 6))
    monkeypatch.setattr(time, "time", lambda: float(next(clock)))
    for k, run in runs.items():
        x = run()
        out = capsys.readouterr().out
        assert f"/{T} steps" in out and "/s | eta" in out, k
        assert torch.equal(x, quiet[k]), k
