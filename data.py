"""Everything the trilemma methods share besides the networks: data sets, batches, pictures, scores, and the
run plumbing (device, DDP, seeding, checkpoints, logging, shared flags, sample-only outputs).

Sections, in file order:
  glyphs, 2-D point sets, real images, load    the data sets: load(name, split, ...) -> (x, y, class_names)
  batches                                      to_float, batches (endless, shuffled, resumable with start=)
  pictures                                     save_grid, save_scatter
  2-D metrics, image metrics, Frechet          score_2d, classifier, score_images, features, frechet
  run plumbing                                 Parser and shared flags, check_args, device and DDP, seeding and
                                               RNG state, checkpoints, the divergence guard, lr and EMA, Log,
                                               samples/scores/metrics, and pieces more than one method uses

Images come back as uint8 tensors (N, C, H, W) and are mapped to [-1, 1] only when batched, so a
cached data set stays small. Built-in sets:
  glyphs-mono  ten digit classes drawn white on black with Pillow's bundled font, 1 channel; no download
  glyphs       the same digits in random colours on random backgrounds, 3 channels
  cifar10      CIFAR-10 from --data-dir: a torchvision copy, else cifar10-jpeg.tar.gz (read in place), else a download
  mnist        torchvision's MNIST, 1 channel (../shared/data holds a copy for offline use)
  stackedmnist three MNIST digits as the R, G, B channels, label 100 d_R + 10 d_G + d_B: 1000 modes
  path/to/dir  any image-folder tree (class sub-folders, optionally under train/ and test/)
  swirl        the shortcut-MCMC 1.5-turn spiral of 1024 points, standardised per axis
  25gaussians  means on {-4,-2,0,2,4}^2 with std 0.05, at their natural scale

    x, y, class_names = load("glyphs", image_size=16)
    for x_batch, y_batch in batches(x, y, 128, flip=False): ...

Image scores (no downloads): a small classifier trained once on the real images (cached); score_images gives
legibility and class coverage under it, features + frechet a Frechet distance in its penultimate features.
"""
import argparse
import contextlib
import functools
import hashlib
import io
import json
import math
import os
import random
import sys
import tarfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageFont

IMAGE_SETS = ("glyphs-mono", "glyphs", "cifar10", "mnist", "stackedmnist")  # anything else that is a directory is an image folder
POINT_SETS = ("swirl", "25gaussians")
LIMITS = {"25gaussians": 5.5, "swirl": 3.0}  # scatter axes are [-L, L]^2


def is_2d(name):
    """True for the 2-D point sets."""
    return name in POINT_SETS


# ---- glyphs: rendered digits ---------------------------------------------------------------
_UP = 4  # render at 4x and average 4x4 blocks: antialiased edges at the final size


@functools.lru_cache(maxsize=4)
def _glyph_bank(size):
    """Pre-rendered digit masks in [0, 1]: (heights, weights, 10, _UP, _UP, m, m) and each height's box m_k.

    One mask per digit, ink height, stroke weight and sub-pixel shift, so that making N images is only
    indexing and compositing in numpy (no per-image drawing)."""
    masks, boxes = [], []
    for h in np.linspace(0.6, 0.9, 5) * size:  # ink height in output pixels: large enough to read at 16x16
        while True:
            fs = round(h * _UP / 0.72)  # the font's digits are ~0.72 of its size tall
            stem = 0.09 * fs / _UP  # and their strokes ~0.09 of it wide, here in output pixels
            # regular >= 1 output pixel and bold 1.6x that: stroke_width widens both sides, in 4x pixels
            strokes = [round((t - stem) * _UP / 2) for t in (max(1.0, stem), max(1.6, 1.6 * stem))]
            font = ImageFont.load_default(size=fs)
            inks = [[_ink(d, font, w) for d in "0123456789"] for w in strokes]
            m = math.ceil(max(max(i.shape) for row in inks for i in row) / _UP) + 1  # box, +1 for the shift
            if m <= size:
                break
            h *= 0.95  # the bold digits overflow a tiny image: shrink until the box fits
        boxes.append(m)
        masks.append([[_shifted(ink, m) for ink in row] for row in inks])
    m_max = max(boxes)
    bank = np.zeros((len(boxes), 2, 10, _UP, _UP, m_max, m_max), np.float32)
    for k, m in enumerate(boxes):
        bank[k, :, :, :, :, :m, :m] = np.array(masks[k])  # pad every height to one shape, top-left
    return bank, np.array(boxes)


def _ink(digit, font, stroke):
    """One digit at high resolution, cropped to its ink, as a float array in [0, 1]."""
    left, top, right, bottom = font.getbbox(digit, stroke_width=stroke)
    img = Image.new("L", (right - left + 2, bottom - top + 2))
    ImageDraw.Draw(img).text((1 - left, 1 - top), digit, fill=255, font=font,
                             stroke_width=stroke, stroke_fill=255)
    return np.asarray(img.crop(img.getbbox()), np.float32) / 255


def _shifted(ink, m):
    """The ink centred in an m x m box at every sub-pixel shift, downsampled: (_UP, _UP, m, m)."""
    h, w = ink.shape
    out = np.zeros((_UP, _UP, m, m), np.float32)
    top, left = (m * _UP - _UP - h) // 2, (m * _UP - _UP - w) // 2
    for dy in range(_UP):
        for dx in range(_UP):
            big = np.zeros((m * _UP, m * _UP), np.float32)
            big[top + dy:top + dy + h, left + dx:left + dx + w] = ink
            out[dy, dx] = big.reshape(m, _UP, m, _UP).mean((1, 3))  # area average = antialiasing
    return out


def _glyphs(n, size, rng, mono=False):
    """n RGB digit images (n, 3, size, size) uint8 and labels 0..9 (balanced, shuffled); mono=True: the same
    digits (fonts, sizes, positions, weights) drawn white on black, one channel (n, 1, size, size)."""
    bank, boxes = _glyph_bank(size)
    y = rng.permutation(np.arange(n) % 10)
    k = rng.integers(0, bank.shape[0], n)  # ink height class
    weight = rng.integers(0, 2, n)  # regular or bold
    shift = rng.integers(0, _UP, (n, 2))  # sub-pixel position
    oy, ox = (rng.random((2, n)) * (size - boxes[k] + 1)).astype(int)  # whole box stays inside
    if mono:
        fg, bg = np.ones((n, 1)), np.zeros((n, 1))
    else:
        fg, bg = rng.random((n, 3)), rng.random((n, 3))
        luma = np.array([0.299, 0.587, 0.114])
        while True:  # redraw colour pairs until the digit stands out (luminance difference >= 0.4)
            bad = np.abs((fg - bg) @ luma) < 0.4
            if not bad.any():
                break
            fg[bad], bg[bad] = rng.random((bad.sum(), 3)), rng.random((bad.sum(), 3))
    m = bank.shape[-1]
    x = np.empty((n, fg.shape[1], size, size), np.uint8)
    for s in range(0, n, 4096):  # chunks keep the float canvas small
        i = np.arange(s, min(s + 4096, n))
        canvas = np.zeros((len(i), size + m, size + m), np.float32)
        rows = oy[i, None, None] + np.arange(m)[None, :, None]  # (B, m, 1)
        cols = ox[i, None, None] + np.arange(m)[None, None, :]  # (B, 1, m)
        canvas[np.arange(len(i))[:, None, None], rows, cols] = bank[k[i], weight[i], y[i],
                                                                     shift[i, 0], shift[i, 1]]
        alpha = canvas[:, None, :size, :size]  # (B, 1, size, size)
        img = bg[i, :, None, None] + alpha * (fg - bg)[i, :, None, None]  # (B, C, size, size)
        x[i] = np.round(img * 255)
    return torch.from_numpy(x), torch.from_numpy(y).long()


# ---- 2-D point sets ------------------------------------------------------------------------
def _swirl_u8(n, rng):
    """The swirl's 8-bit values (n, 2) as in the shortcut-MCMC code (METHODS.md)."""
    theta = 3 * np.pi * np.sqrt(rng.random(n))
    r = 2 * theta + np.pi
    x = np.stack([r * np.cos(theta), r * np.sin(theta)], 1)
    return np.clip(4 * (x + 0.25 * rng.standard_normal((n, 2)) + 30), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _swirl_stats():
    """Per-axis mean and std of one large fixed draw, so every split shares one scaling."""
    ref = _swirl_u8(1_000_000, np.random.default_rng(20230104)).astype(np.float64)
    return ref.mean(0), ref.std(0)


def swirl_scale():
    """(mean, std) float32 tensors (2,): x_8bit = x * std + mean recovers the swirl's 8-bit values."""
    mean, std = _swirl_stats()
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def _means_25():
    """The 25 means on {-4,-2,0,2,4}^2; mode k = 5 i + j sits at (-4 + 2i, -4 + 2j)."""
    g = np.arange(-4.0, 5.0, 2.0)
    return np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(25, 2)  # (25, 2)


def _points(name, n, rng):
    """n points (n, 2) float32 and labels (mode index for 25gaussians, zeros for swirl)."""
    if name == "25gaussians":
        y = rng.integers(0, 25, n)
        x = _means_25()[y] + 0.05 * rng.standard_normal((n, 2))
    else:
        mean, std = _swirl_stats()
        x, y = (_swirl_u8(n, rng) - mean) / std, np.zeros(n, np.int64)
    return torch.from_numpy(x).float(), torch.from_numpy(y).long()


# ---- real images ---------------------------------------------------------------------------
def _fit(x, size):
    """Resize (..., H, W) uint8 so the shorter side is `size` (antialiased), then centre-crop."""
    if x.shape[-2:] == (size, size):
        return x
    return TF.center_crop(TF.resize(x, size, antialias=True), [size, size])


def _torchvision(name, split, data_dir):
    """CIFAR-10 or MNIST through torchvision: an existing copy first, then a download."""
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.MNIST
    ds = None
    for download in (False, True):  # download=False avoids touching the network for a local copy
        try:
            ds = cls(data_dir, train=split == "train", download=download)
            break
        except Exception:
            pass
    if ds is None:
        raise ValueError(f"cannot download {name} to {data_dir} (offline?); use --data glyphs, or --data "
                         "path/to/folder (an image-folder tree such as an extracted ../shared/data/"
                         "cifar10-jpeg.tar.gz), or --data-dir pointing at an existing copy (for cifar10 also "
                         "a folder holding cifar10-jpeg.tar.gz, e.g. ../shared/data)")
    if name == "cifar10":
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # (N, 32, 32, 3) -> (N, 3, 32, 32)
    else:
        x = ds.data.unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
    return x, torch.as_tensor(ds.targets).long(), list(ds.classes)


def _folder(root, split, size):
    """An image-folder tree as uint8 (N, C, size, size): C = 1 when every image is grayscale, else 3 (RGB).
    root/train and root/test are the splits when both exist; otherwise the class folders (under root/train, or
    root itself) are split here: every 10th image of a class is the test split (all of them for a class of
    fewer than 10 images, which then serves both splits)."""
    train, test = (os.path.isdir(os.path.join(root, s)) for s in ("train", "test"))
    hold_out = not (train and test)
    root = os.path.join(root, "train" if hold_out and train else split if not hold_out else "")
    try:
        ds = torchvision.datasets.ImageFolder(root)  # only to list files and classes
    except (FileNotFoundError, OSError) as e:
        raise ValueError(f"cannot read image folder {root}: {e}") from None
    samples = ds.samples
    if hold_out:
        by_class = {}
        for p, c in samples:
            by_class.setdefault(c, []).append((p, c))
        samples = [s for c in sorted(by_class) for i, s in enumerate(by_class[c])
                   if len(by_class[c]) < 10 or (i % 10 == 9) == (split == "test")]
    imgs = []
    for p, _ in samples:
        try:
            with Image.open(p) as img:
                imgs.append(img.convert("L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image {p}: {type(e).__name__}: {str(e)[:120]}") from None
    mode = "L" if all(img.mode == "L" for img in imgs) else "RGB"     # a mixed folder becomes RGB throughout
    imgs = [torch.from_numpy(np.array(img.convert(mode))).reshape(img.height, img.width, -1).permute(2, 0, 1)
            for img in imgs]                                                       # (C, H, W) each
    if len({t.shape for t in imgs}) == 1:
        x = _fit(torch.stack(imgs), size)  # one batched resize when every image has the same shape
    else:
        x = torch.stack([_fit(t, size) for t in imgs])
    return x, torch.tensor([c for _, c in samples]).long(), list(ds.classes)


def _cifar_tarball(path, split, classes):
    """CIFAR-10 from the image-folder tarball (split/<class>/NNNN.jpg, ../shared/data/cifar10-jpeg.tar.gz), read in
    place: nothing is extracted, so a read-only data folder works and an interrupted read leaves nothing behind.
    Only the classes asked for (names or indices) are decoded. Returns 32x32 RGB uint8, labels, all class names."""
    files = {}                                                   # class -> [(file name, jpeg bytes)]
    try:
        with tarfile.open(path) as tf:
            for m in tf:                                         # one sequential pass over the gzip stream
                parts = m.name.split("/")
                parts = parts[1:] if parts[0] == "." else parts
                if m.isfile() and len(parts) == 3 and parts[0] == split:
                    files.setdefault(parts[1], []).append((parts[2], tf.extractfile(m).read()))
    except (OSError, tarfile.TarError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    names = sorted(files)                                        # CIFAR-10's label order is alphabetical
    if not names:
        raise ValueError(f"{path} holds no {split}/<class>/ images")
    keep = set(names) if not classes else {names[int(c)] if c not in names and c.isdigit() and int(c) < len(names)
                                           else c for c in classes}
    xs, ys = [], []
    for k, c in enumerate(names):
        if c in keep:
            for _, jpeg in sorted(files[c]):                     # NNNN.jpg: the original order within the class
                xs.append(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
                ys.append(k)
    if not xs:                                                   # unknown class names: the caller lists the valid ones
        return torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), names
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2)     # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return x, torch.tensor(ys), names


def _stacked_mnist(split, data_dir, size, rng):
    """Stacked MNIST (Metz et al. 2017; the DDGAN paper's mode-coverage test): each image stacks three MNIST digits
    drawn at random from the split as its R, G, B channels; label 100 d_R + 10 d_G + d_B, so 1000 modes.
    60,000 train / 10,000 test triples, fixed by rng (the seed)."""
    digits, y, _ = _torchvision("mnist", split, data_dir)
    digits = _fit(digits, size)                                  # (M, 1, size, size): resize once, then stack
    n = 60_000 if split == "train" else 10_000
    idx = torch.from_numpy(rng.integers(0, len(digits), (n, 3)))
    x = digits[idx, 0]                                           # (n, 3) indices -> (n, 3, size, size)
    return x, (y[idx] * torch.tensor([100, 10, 1])).sum(1), [f"{k:03d}" for k in range(1000)]


# ---- load ----------------------------------------------------------------------------------
def load(name, split="train", image_size=16, data_dir="./data", classes=None, seed=0):
    """Return (x, y, class_names): images uint8 (N, C, image_size, image_size) or points float32 (N, 2),
    labels int64 (N,). `classes` (names or indices as strings) keeps a subset, labels re-indexed 0..k-1.
    Cached in memory: treat the returned tensors as read-only."""
    classes = tuple(str(c) for c in classes) if classes else None  # hashable, for the cache
    return _load(name, split, int(image_size), data_dir, classes, seed)


@functools.lru_cache(maxsize=8)
def _load(name, split, image_size, data_dir, classes, seed):
    """Cached body of load()."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split '{split}': choose train or test")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])  # test: a separate stream
    if name in POINT_SETS:
        if classes:
            raise ValueError(f"--classes applies to image data sets, not {name}")
        n = {"25gaussians": 100_000 if split == "train" else 2_500, "swirl": 1024}[name]
        return *_points(name, n, rng), []
    if name in ("glyphs", "glyphs-mono"):
        if image_size < 8:
            raise ValueError(f"glyphs need an image size of at least 8, got {image_size}")
        x, y = _glyphs(30_000 if split == "train" else 5_000, image_size, rng, mono=name == "glyphs-mono")
        names = [str(d) for d in range(10)]
    elif name == "stackedmnist":
        x, y, names = _stacked_mnist(split, data_dir, image_size, rng)
    elif (name == "cifar10" and os.path.isfile(os.path.join(data_dir, "cifar10-jpeg.tar.gz"))
          and not os.path.isdir(os.path.join(data_dir, "cifar-10-batches-py"))):  # no torchvision copy: the tarball
        x, y, names = _cifar_tarball(os.path.join(data_dir, "cifar10-jpeg.tar.gz"), split, classes)
        x = _fit(x, image_size) if len(x) else x
    elif name in IMAGE_SETS:
        x, y, names = _torchvision(name, split, data_dir)
        x = _fit(x, image_size)
    elif os.path.isdir(name):
        x, y, names = _folder(name, split, image_size)
    else:
        raise ValueError(f"unknown dataset '{name}': choose glyphs, cifar10, mnist, stackedmnist, swirl, "
                         "25gaussians or an image folder")
    if classes:
        keep = []
        for c in classes:
            if c in names:
                keep.append(names.index(c))
            elif c.isdigit() and int(c) < len(names):
                keep.append(int(c))
            else:
                raise ValueError(f"unknown class '{c}' for {name}: choose from {', '.join(names)} "
                                 f"or an index 0..{len(names) - 1}")
        keep = list(dict.fromkeys(keep))  # drop repeats, keep the given order
        new_label = torch.full((len(names),), -1, dtype=torch.long)
        new_label[keep] = torch.arange(len(keep))
        mask = new_label[y] >= 0
        x, y, names = x[mask], new_label[y[mask]], [names[i] for i in keep]
    return x, y, names


# ---- batches -------------------------------------------------------------------------------
def to_float(x):
    """uint8 images -> float32 in [-1, 1] (k / 127.5 - 1); float points pass through unchanged."""
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x


def batches(x, y, batch_size, flip=False, seed=0, device="cpu", start=0):
    """Endless iterator of shuffled (x_batch float32, y_batch int64) on `device`, reshuffled each epoch.

    Under torch.distributed each rank reads its own shard (DistributedSampler); batch_size is per
    process. flip=True mirrors a random half of each image batch left-right. start=n skips the first n
    batches exactly (the same orders and flips, without touching the images): --resume continues the data."""
    x, y = x.to(device), y.to(device)  # uint8 images are small: keep them on the device once
    ddp = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if ddp else 0
    sampler = torch.utils.data.DistributedSampler(range(len(x)), shuffle=True, seed=seed) if ddp else None
    gen = torch.Generator().manual_seed(seed + rank)  # order (single process) and flips (per rank)
    flip = flip and x.dim() == 4
    epoch, drawn = 0, 0
    while True:
        if ddp:
            sampler.set_epoch(epoch)  # same permutation on every rank, a different one each epoch
            idx = torch.tensor(list(sampler))
        else:
            idx = torch.randperm(len(x), generator=gen)
        if len(idx) < batch_size:  # tiny data set: repeat it so a full batch exists
            idx = idx.repeat(math.ceil(batch_size / len(idx)))
        for s in range(0, len(idx) - batch_size + 1, batch_size):  # drop_last
            mirror = torch.rand(batch_size, generator=gen) < 0.5 if flip else None
            drawn += 1
            if drawn <= start:  # fast-forward: the random draws above, nothing else
                continue
            i = idx[s:s + batch_size].to(device)
            xb = to_float(x[i])
            if flip:
                xb = torch.where(mirror.to(device)[:, None, None, None], xb.flip(3), xb)
            yield xb, y[i]
        epoch += 1


# ---- pictures ------------------------------------------------------------------------------
def _save_png(img, path):
    """Write a PIL image atomically (a half-written PNG is never seen under its real name)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def _to_uint8(x):
    """Images in [-1, 1] (or already uint8) -> uint8 on the CPU."""
    x = x.detach().cpu()
    return x if x.dtype == torch.uint8 else ((x.float() + 1) * 127.5).round().clamp(0, 255).byte()


def save_grid(x, path, nrow=None, real=None):
    """Save images (N, C, H, W) in [-1, 1] as one PNG grid, nrow per row (default ~sqrt(N)); `real`
    images (M, C, H, W) add one row at the bottom after a small gap. Small images are upscaled."""
    x = _to_uint8(x)
    nrow = nrow or math.ceil(math.sqrt(len(x)))
    grid = torchvision.utils.make_grid(x, nrow=nrow, padding=1, pad_value=255)  # (3, Hg, Wg)
    if real is not None:
        ncol = min(nrow, len(x))  # the real row is as wide as the grid
        r = _fit(_to_uint8(real[:ncol]), x.shape[-1])  # real data may be stored at another size
        blank = torch.full((ncol - len(r), *x.shape[1:]), 255, dtype=torch.uint8)
        row = torchvision.utils.make_grid(torch.cat([r, blank]), nrow=ncol, padding=1, pad_value=255)
        gap = torch.full((3, 2, grid.shape[2]), 255, dtype=torch.uint8)
        grid = torch.cat([grid, gap, row], 1)
    scale = max(1, min(4, 128 // x.shape[2]))  # x4 for 32x32 and smaller, so the PNG is readable
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    _save_png(img.resize((img.width * scale, img.height * scale), Image.NEAREST), path)


def save_scatter(points, path, name, real=None, color=(200, 40, 40), titles=None):
    """Scatter 2-D points (N, 2) over `real` points in light grey on fixed axes [-L, L]^2
    (L = LIMITS[name]); a list of point sets draws side-by-side panels with optional titles."""
    panels = list(points) if isinstance(points, (list, tuple)) else [points]
    size, gap, top = 400, 10, 20 if titles else 0
    lim = LIMITS.get(name, 3.0)
    canvas = np.full((size + top, len(panels) * (size + gap) - gap, 3), 255, np.uint8)

    def dots(p, left, rgb):
        """2x2-pixel dots; points outside the axes are pinned to the frame so divergence shows."""
        p = torch.as_tensor(p).detach().cpu().double().numpy().reshape(-1, 2)
        col = np.clip((p[:, 0] + lim) / (2 * lim) * (size - 2), 0, size - 2).astype(int)
        row = np.clip((lim - p[:, 1]) / (2 * lim) * (size - 2), 0, size - 2).astype(int)  # y up
        for dy in (0, 1):
            for dx in (0, 1):
                canvas[top + row + dy, left + col + dx] = rgb

    for j, p in enumerate(panels):
        if real is not None:
            dots(real, j * (size + gap), (200, 200, 200))
        dots(p, j * (size + gap), color)
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for j in range(len(panels)):
        left = j * (size + gap)
        draw.rectangle([left, top, left + size - 1, top + size - 1], outline=(0, 0, 0))
        if titles:
            draw.text((left + 4, 3), str(titles[j]), fill=(0, 0, 0), font=ImageFont.load_default(size=13))
    _save_png(img, path)


# ---- 2-D metrics ---------------------------------------------------------------------------
def _mean_dist(a, b):
    """E|A - B| over all pairs, in row chunks so large sets do not build one huge matrix."""
    step = max(1, 2**22 // len(b))
    # the direct difference form: the faster matmul form loses digits for near-identical points
    return sum(torch.cdist(a[s:s + step], b, compute_mode="donot_use_mm_for_euclid_dist").sum()
               for s in range(0, len(a), step)) / (len(a) * len(b))


def score_2d(samples, name, seed=0):
    """Score samples (N, 2) against held-out real points. 'energy': energy distance
    2E|X-Y| - E|X-X'| - E|Y-Y'| to fresh real draws Y of size N; 'energy_floor': the same between two real
    draws of size N. For 25gaussians also 'modes' (of 25), 'hq' (% within 0.15 = 3 std of the nearest
    mean) and 'kl' (KL of the high-quality samples' mode histogram from uniform; log 25 if none)."""
    if name not in POINT_SETS:
        raise ValueError(f"score_2d needs a 2-D data set ({', '.join(POINT_SETS)}), got '{name}'")
    x = torch.as_tensor(samples).detach().cpu().double().reshape(-1, 2)
    n = len(x)
    if n < 2:
        raise ValueError(f"score_2d needs at least 2 samples, got {n}")

    # One reference draw of ~1k points is noisy (two real swirl draws score 0.001..0.01), so both numbers
    # average over 4 held-out draws Y_r: energy to each Y_r, floor over the pairs (Y_r, Y_r+1 mod 4).
    # Both are V-statistics (>= 0) of the same size, so they share their small-sample bias.
    ys = [_points(name, n, np.random.default_rng([seed, 2, r]))[0].double() for r in range(4)]  # 0, 1: splits
    d_xx, d_yy = _mean_dist(x, x), [_mean_dist(y, y) for y in ys]
    energy = [2 * _mean_dist(x, ys[r]) - d_xx - d_yy[r] for r in range(4)]
    floor = [2 * _mean_dist(ys[r], ys[r - 1]) - d_yy[r] - d_yy[r - 1] for r in range(4)]
    out = {"energy": float(sum(energy)) / 4, "energy_floor": float(sum(floor)) / 4}
    if name == "25gaussians":
        dist_to_mean, mode = torch.cdist(x, torch.from_numpy(_means_25())).min(1)
        good = dist_to_mean <= 0.15
        counts = torch.bincount(mode[good], minlength=25).double()
        p = counts / counts.sum().clamp(min=1)
        kl = (p * torch.log(p * 25 + 1e-12)).sum().item() if good.any() else math.log(25)
        out.update(modes=int((counts > 0).sum()), hq=100 * good.double().mean().item(), kl=kl)
    return out


# ---- image metrics -------------------------------------------------------------------------
def _classifier(in_ch, size, k):
    """A small CNN: size -> size/2 -> size/4, then 128 penultimate features -> k + 1 logits (last: 'no digit')."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_ch, 32, 3, padding=1), torch.nn.SiLU(),
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.SiLU(),
        torch.nn.Conv2d(64, 64, 3, stride=2, padding=1), torch.nn.SiLU(), torch.nn.Flatten(),
        torch.nn.Linear(64 * math.ceil(size / 4) ** 2, 128), torch.nn.SiLU(), torch.nn.Linear(128, k + 1))


def _junk(x):
    """Images that show no single class, for the classifier's reject class (x: a float batch in [-1, 1]): noise,
    blurred noise, flat colour, blends of two or four real images (what a collapsed or mode-averaging generator
    draws), smooth low-frequency colour blobs at several scales, heavily blurred digits, and partial digits."""
    n, C, H, W = x.shape
    u = lambda *shape: torch.rand(*shape) * 2 - 1                                     # uniform in [-1, 1]
    noise = u(n, C, H, W)
    blurred = F.avg_pool2d(noise, 3, 1, 1) * 2
    flat = noise[:, :, :1, :1].expand_as(x)
    blend2 = 0.5 * (x + x.roll(1, 0))
    blend4 = 0.25 * (x + x.roll(1, 0) + x.roll(2, 0) + x.roll(3, 0))
    scale = torch.randint(0, 3, (n, 1, 1, 1))                                        # 2x2, 3x3 or 5x5 cells
    blobs = sum(torch.where(scale == j, F.interpolate(u(n, C, k, k), size=(H, W), mode="bicubic",
                                                       align_corners=False), 0.0) for j, k in enumerate((2, 3, 5)))
    smeared = F.avg_pool2d(F.avg_pool2d(x, 5, 1, 2, count_include_pad=False), 5, 1, 2, count_include_pad=False)
    rows, cols = torch.arange(H)[None, :, None], torch.arange(W)[None, None, :]
    top, left = torch.randint(0, 2, (2, n, 1, 1))                                  # keep one random quadrant
    keep = ((rows < H // 2) == top.bool()) & ((cols < W // 2) == left.bool())
    partial = torch.where(keep[:, None], x, x[:, :, :1, :1])                        # the rest: background colour
    kinds = [noise, blurred, flat, blend2, blend4, blobs.clamp(-1, 1), smeared, partial]
    kind = torch.randint(0, len(kinds), (n, 1, 1, 1))
    return sum(torch.where(kind == j, k, 0.0) for j, k in enumerate(kinds)).clamp(-1, 1)


def _nuisance(x):
    """Random blur, lower contrast and grain on real images (x: a float batch in [-1, 1]): a generated digit that
    is a little soft, faint or grainy is still that digit, and must not read as "no digit"."""
    u = torch.rand(3, len(x), 1, 1, 1)
    x = torch.lerp(x, torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False), 0.7 * u[0])
    mean = x.mean((2, 3), keepdim=True)
    x = mean + (x - mean) * (1 - 0.5 * u[1])
    return x + 0.1 * u[2] * torch.randn_like(x)


def _writable(folder):
    """False for a folder marked read-only (e.g. ../shared/data, even for root, who may write anyway)."""
    return not os.path.isdir(folder) or bool(os.stat(folder).st_mode & 0o222 and os.access(folder, os.W_OK))


@functools.lru_cache(maxsize=4)
def classifier(name, image_size=16, data_dir="./data", classes=None, epochs=3):
    """Train (once per process, well under a minute on a CPU) a small CNN on the real training images of a
    labelled data set, with one extra reject class learned from junk images (noise, flat colour, blends of two
    images), so that an illegible sample is not forced into a class. Returns (model in eval mode on the CPU,
    accuracy on the real test split in %, class_names). The caller's random state is left untouched.
    The trained weights are cached under data_dir/classifiers/ (./data/classifiers/ when data_dir is read-only),
    so later runs skip the training."""
    x, y, names = load(name, "train", image_size, data_dir, classes)
    k = len(names)
    digest = hashlib.sha1(x.numpy().tobytes()).hexdigest()[:12]  # the cache follows the data, not its name
    file = f"v4_{digest}_{len(names)}_{epochs}.pt"
    caches = [os.path.join(d, "classifiers", file) for d in (data_dir, "./data")]
    cache = next((c for c in caches if os.path.isfile(c)), caches[0] if _writable(data_dir) else caches[1])
    net = _classifier(x.shape[1], image_size, k)
    if os.path.isfile(cache):
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        net.load_state_dict(saved["state"])
        return net.eval().requires_grad_(False), saved["acc"], names
    xt, yt, _ = load(name, "test", image_size, data_dir, classes)
    with torch.random.fork_rng(), torch.enable_grad():               # also when called under no_grad
        torch.manual_seed(0)
        net = _classifier(x.shape[1], image_size, k)                   # the same init on every machine
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(epochs):
            for i in torch.randperm(len(x)).split(128):
                xb = to_float(x[i])
                junk = _junk(xb[: len(i) // 6])                     # a seventh of each batch is junk
                xb = _nuisance(xb)
                xb, yb = torch.cat([xb, junk]), torch.cat([y[i], torch.full((len(junk),), k)])
                loss = torch.nn.functional.cross_entropy(net(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
    net.eval().requires_grad_(False)
    acc = 100 * (torch.cat([net(to_float(b)).argmax(1) for b in xt.split(1000)]) == yt).float().mean().item()
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    torch.save({"state": net.state_dict(), "acc": acc}, cache + ".tmp")
    os.replace(cache + ".tmp", cache)
    return net, acc, names


def score_images(samples, name, image_size=16, data_dir="./data", classes=None):
    """Score generated images in [-1, 1] (N, C, H, W) with a classifier trained on the real training set.

    'legible': % of samples given one real class with probability >= 0.9 (not the reject class);
    'classes_covered': classes holding >= 1% of the samples; 'min_class_share': the rarest class's % of the
    samples; 'kl_classes': KL of the predicted-class histogram (legible samples) from the real one;
    'clf_acc': the classifier's accuracy on the real test split (%), to show the others can be trusted.
    {} for 2-D or single-class data. Stacked MNIST: the MNIST classifier reads each channel; a sample is legible
    when all three digits are, its class is the mode 100 d_R + 10 d_G + d_B, and 'classes_covered' counts the
    modes holding >= 1 sample (the DDGAN paper's count; >= 1% would mean nothing for 1000 modes)."""
    if is_2d(name) or (classes and len(set(map(str, classes))) < 2):
        return {}
    if name == "stackedmnist":
        return _score_stacked(samples, image_size, data_dir, classes)
    net, acc, names = classifier(name, image_size, data_dir, tuple(str(c) for c in classes) if classes else None)
    k = len(names)
    if k < 2:
        return {}
    x = torch.as_tensor(samples).detach().float().cpu().clamp(-1, 1)
    prob = torch.cat([net(b).softmax(1) for b in x.split(1000)])                       # (N, k + 1)
    conf, pred = prob.max(1)
    legible = (conf >= 0.9) & (pred < k)
    hist = torch.bincount(pred[legible], minlength=k + 1)[:k].double() / len(x)
    p = hist / hist.sum().clamp(min=1e-12)
    real = torch.bincount(load(name, "train", image_size, data_dir, classes)[1], minlength=k).double()
    kl = (p * torch.log((p + 1e-12) / (real / real.sum()))).sum().item() if legible.any() else math.log(k)
    return {"legible": 100 * legible.double().mean().item(), "classes_covered": int((hist >= 0.01).sum()),
            "min_class_share": 100 * hist.min().item(), "kl_classes": kl, "clf_acc": acc}


def _score_stacked(samples, image_size, data_dir, classes):
    """score_images for Stacked MNIST: the MNIST digit classifier on each of the three channels."""
    net, acc, _ = classifier("mnist", image_size, data_dir)
    y_real, names = load("stackedmnist", "train", image_size, data_dir, classes)[1:]
    x = torch.as_tensor(samples).detach().float().cpu().clamp(-1, 1)
    B, C, H, W = x.shape
    prob = torch.cat([net(b).softmax(1) for b in x.reshape(B * C, 1, H, W).split(1000)]).reshape(B, C, -1)
    conf, digit = prob.max(2)                                                           # (B, 3) each
    legible = ((conf >= 0.9) & (digit < 10)).all(1)                                     # 10 = the reject class
    index = torch.full((1000,), -1, dtype=torch.long)                                   # mode -> position in names
    index[[int(n) for n in names]] = torch.arange(len(names))
    mode = index[(digit.clamp(max=9) * torch.tensor([100, 10, 1])).sum(1)]
    ok = legible & (mode >= 0)
    counts = torch.bincount(mode[ok], minlength=len(names)).double()
    p, q = counts / counts.sum().clamp(min=1), torch.bincount(y_real, minlength=len(names)).double()
    q = q / q.sum()
    kl = (p * torch.log((p + 1e-12) / q.clamp(min=1e-12))).sum().item() if ok.any() else math.log(len(names))
    return {"legible": 100 * legible.double().mean().item(), "classes_covered": int((counts > 0).sum()),
            "min_class_share": 100 * counts.min().item() / len(x), "kl_classes": kl, "clf_acc": acc}


# ---- Frechet distance in the classifier's feature space -------------------------------------------
@torch.no_grad()
def features(x, name, image_size=16, data_dir="./data", classes=None):
    """Penultimate-layer features (N, 128) of the cached classifier (classifier(name, ...)) for images (N, C, H, W)
    in [-1, 1] or uint8. Stacked MNIST: the MNIST classifier's features of each channel, concatenated (N, 384).
    With classes=None the classifier learned every class of the set: the richest feature space, also for
    scoring a one-class subset such as CIFAR-10 airplanes."""
    x = to_float(torch.as_tensor(x).detach().cpu()).float().clamp(-1, 1)
    if name == "stackedmnist":
        net = classifier("mnist", image_size, data_dir)[0]
        B, C, H, W = x.shape
        return _penultimate(net, x.reshape(B * C, 1, H, W)).reshape(B, -1)               # (B, 3 * 128)
    net = classifier(name, image_size, data_dir, tuple(str(c) for c in classes) if classes else None)[0]
    return _penultimate(net, x)


@torch.no_grad()
def _penultimate(net, x):
    """The classifier's penultimate activations: every layer but the last Linear, in chunks of 1000."""
    return torch.cat([net[:-1](b) for b in x.split(1000)])


def frechet(feat_a, feat_b):
    """Frechet distance between Gaussians fitted to two feature sets (N, F) and (M, F), as FID (Heusel et al. 2017)
    computes it: |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2), in float64.
    tr((C_a C_b)^1/2) is taken from the symmetric PSD form C_a^1/2 C_b C_a^1/2, whose eigenvalues are real and
    >= 0, so no complex square root (scipy's sqrtm) is needed."""
    a, b = (torch.as_tensor(f).detach().cpu().double().reshape(len(f), -1) for f in (feat_a, feat_b))
    if min(len(a), len(b)) < 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet needs two sets of >= 2 feature vectors of one width, got {a.shape}, {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = (a - mu_a).T @ (a - mu_a) / (len(a) - 1)                                    # (F, F), unbiased
    cov_b = (b - mu_b).T @ (b - mu_b) / (len(b) - 1)
    w, v = torch.linalg.eigh(cov_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T                                          # C_a^1/2
    m = root_a @ cov_b @ root_a
    tr_root = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_root)


# ==== run plumbing: the part of every method file that is not the method ==============================
# Shared flags, one-line errors, device and DDP, seeding and RNG state, checkpoints, the guard against a
# diverged update, the lr schedule, the EMA, the log line, and writing samples and metrics.
class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr ("prog: error: ...") and exit code 2, not the usage block."""

    def error(self, message):
        die(f"{self.prog}: error: {message}")


def die(message, code=2):
    """Print one line on stderr and exit (2: bad input, 1: a training run that diverged)."""
    sys.stderr.write(message.rstrip() + "\n")
    sys.stderr.flush()
    raise SystemExit(code)


def _default_help(defaults, key):
    """' (default: 5000 images, 20000 2-D; the paper's ...)' from a script's DEFAULTS (one value when both agree)."""
    image, two_d = defaults["image"].get(key), defaults["2d"].get(key)
    text = f"default {image:g}" if image == two_d and isinstance(image, float) else f"default {image}"
    if image != two_d:
        text = f"default: {image} images, {two_d} 2-D"
    return f" ({text}{defaults.get(key + '_note', '')})"


def add_shared_args(p, out, defaults, data_help, hidden=512, g=""):
    """The flags every method shares, in argparse groups. Training flags listed in a script's DEFAULTS
    ({"image": {...}, "2d": {...}}) default to None here and are filled in by apply_defaults; their help says
    both values. `g` names the network the model flags shape (" of G" in ddgan). Returns the groups."""
    d = p.add_argument_group("data")
    d.add_argument("--data", default=defaults["data"], help=f"{data_help} (default {defaults['data']})")
    d.add_argument("--data-dir", default="./data", help="where cifar10/mnist are stored or downloaded")
    d.add_argument("--classes", nargs="+", default=None, help="keep these classes (names or indices)")
    d.add_argument("--image-size", type=int, default=16, help="images are resized to this size")
    d.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False, help="random horizontal flips")
    m = p.add_argument_group("model")
    m.add_argument("--ch", type=int, default=32, help=f"UNet base channels{g}")
    m.add_argument("--ch-mult", type=int, nargs="+", default=[1, 2, 2], help="UNet channel multiplier per level")
    m.add_argument("--num-res-blocks", type=int, default=1, help=f"residual blocks per UNet level{g}")
    m.add_argument("--attn-res", type=int, nargs="*", default=[], help="resolutions with self-attention, e.g. 16")
    m.add_argument("--dropout", type=float, default=0.0, help=f"dropout in the residual blocks{g} (the paper's "
                   "0.1 on CIFAR-10; a short run only underfits)")
    m.add_argument("--temb-dim", type=int, default=None, help="time-embedding width (default 4 * ch)")
    m.add_argument("--hidden", type=int, default=hidden, help="2-D MLP width")
    m.add_argument("--layers", type=int, default=3, help="2-D MLP hidden layers")
    t = p.add_argument_group("training")
    helps = dict(steps="training steps", batch_size="batch per process", lr="peak learning rate",
                 warmup="linear lr warm-up steps", grad_clip="gradient-norm clipping (0: off)",
                 ema="EMA decay of the sampling weights")
    for key, text in helps.items():
        if key in defaults["image"]:
            kind = int if key in ("steps", "batch_size", "warmup") else float
            t.add_argument("--" + key.replace("_", "-"), type=kind, default=None,
                           help=text + _default_help(defaults, key))
    if "lr_schedule" in defaults["image"]:
        t.add_argument("--lr-schedule", choices=["constant", "cosine"], default=None,
                       help="lr after the warm-up" + _default_help(defaults, "lr_schedule"))
    r = p.add_argument_group("output and runtime")
    r.add_argument("--out", default=out, help="folder for ckpt.pt, samples, log.txt, metrics.json")
    r.add_argument("--n-samples", type=int, default=None, help="samples per grid / final evaluation"
                   + _default_help(defaults, "n_samples"))
    r.add_argument("--sample-every", type=int, default=None, help="save a sample grid every this many steps "
                   "(0: at the end only)" + _default_help(defaults, "sample_every"))
    r.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every this many steps")
    r.add_argument("--log-every", type=float, default=5.0, help="seconds between log lines")
    r.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt, exactly (RNG and data order)")
    r.add_argument("--sample-only", action="store_true", help="only sample from a checkpoint (OUT/ckpt.pt or --ckpt)")
    r.add_argument("--ckpt", default=None, help="checkpoint for --sample-only (default OUT/ckpt.pt)")
    r.add_argument("--save-npz", action="store_true", help="also save the final samples as a uint8 .npz (FID tools)")
    r.add_argument("--seed", type=int, default=0, help="random seed (rank is added under DDP)")
    r.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto", help="where to run")
    r.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="autocast dtype of the networks")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the network")
    return d, m, t, r


def apply_defaults(args, defaults):
    """Fill the flags left at None from DEFAULTS["2d"] or DEFAULTS["image"], by the data set."""
    for k, v in defaults["2d" if is_2d(args.data) else "image"].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def check_args(args):
    """Reject shared flags that cannot run, with one clear line (ValueError), before anything is written."""
    def bad(name, text):
        raise ValueError(f"--{name.replace('_', '-')} {text}")
    if args.sample_only:
        if args.n_samples is not None and args.n_samples < 1:
            bad("n_samples", "must be at least 1")
    else:
        for k in ("steps", "batch_size", "n_samples", "ckpt_every", "image_size"):
            if getattr(args, k) is not None and getattr(args, k) < 1:
                bad(k, "must be at least 1")
        for k in ("lr", "lr_g", "lr_d"):
            v = getattr(args, k, None)
            if v is not None and not (math.isfinite(v) and v > 0):
                bad(k, f"must be a positive number, got {v}")
        for k in ("grad_clip", "warmup", "sample_every"):
            v = getattr(args, k, None)
            if v is not None and not (math.isfinite(v) and v >= 0):
                bad(k, f"must be >= 0, got {v}")
        if getattr(args, "ema", None) is not None and not 0 <= args.ema < 1:
            bad("ema", f"must be in [0, 1), got {args.ema}")
    if not (math.isfinite(args.log_every) and args.log_every >= 0):
        bad("log_every", "must be a number of seconds >= 0 (0: every step)")
    check_writable(args.out)
    pick_device(args.device)


def check_writable(folder):
    """ValueError unless `folder` is (or can be made) a writable directory; creates nothing."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--out {folder} is a file, not a folder")
    parent = folder
    while not os.path.exists(parent):                            # the nearest folder that exists
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {folder} cannot be written ({parent} is not a writable folder)")


# ---- device, DDP, seeding, RNG state ----------------------------------------------------------------
def pick_device(name):
    """--device: auto is CUDA when present, else Apple mps, else the CPU; an absent device is a ValueError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (try --device auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: no Apple mps device is available here (try --device auto)")
    return name


def setup_ddp(device_name):
    """nanoGPT's way: RANK in the environment (torchrun) switches DDP on, nccl on CUDA, gloo on the CPU.
    Returns (rank, world, device); rank 0 logs, samples and saves."""
    device = pick_device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def wrap_ddp(model, device):
    """The module DDP trains (itself when not distributed); gradients are all-reduced in backward."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)


def teardown_ddp():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_all(seed):
    """Seed torch (CPU and CUDA), numpy and python's random; flush denormals (CPU steps ~10x faster)."""
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state():
    """Every RNG a training step may draw from, as tensors and ints (a weights_only checkpoint can hold them)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), numpy=[torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
                 python=list(random.getstate()[1]))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Undo rng_state(): the run continues with exactly the random numbers it would have drawn."""
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    random.setstate((3, tuple(int(v) for v in state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- checkpoints --------------------------------------------------------------------------------------
def save_checkpoint(path, method, step, args, **states):
    """One complete ckpt.pt: every module's and optimizer's state_dict (from the unwrapped module), the step, the
    run's settings and every RNG. Written to a temporary file, flushed to disk, then renamed over the old one,
    so a crash or kill -9 at any moment leaves either the old or the new checkpoint, never a torn one."""
    ckpt = dict(method=method, step=step, args=args, rng=rng_state(), **{k: v.state_dict() for k, v in states.items()})
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, method, keys=(), arch=(), upgrade=None):
    """Read a checkpoint of `method` holding `keys` (state dicts) and `arch` (in its args), or raise a ValueError
    of one line: missing, unreadable (truncated, random bytes), another method's, or incomplete. upgrade(args), if
    given, first brings the settings of a checkpoint written by an older version of the method up to date."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                       # torch raises many types for a damaged file
        raise ValueError(f"cannot read checkpoint {path} ({type(e).__name__}): damaged or not a checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("method") != method:
        found = ckpt.get("method") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a {method} checkpoint (method: {found})")
    if upgrade is not None and isinstance(ckpt.get("args"), dict):
        upgrade(ckpt["args"])
    missing = [k for k in ("step", "args", *keys) if k not in ckpt]
    missing += [f"args.{k}" for k in arch if k not in ckpt.get("args", {})]
    if missing:
        raise ValueError(f"{path} is an incomplete {method} checkpoint: it lacks {', '.join(missing)}")
    return ckpt


def load_states(ckpt, path, **targets):
    """Load ckpt[name] into each module or optimizer; a mismatch (missing key, wrong shape) is one ValueError."""
    for name, target in targets.items():
        try:
            target.load_state_dict(ckpt[name])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()
            first = next((s.strip() for s in first[1:] if s.strip()), first[0] if first else "") if first else ""
            raise ValueError(f"{path} does not fit this model ({name}): {first[:200]}") from None


def resume_or_refuse(args, method, keys, arch, upgrade=None):
    """--resume: the run's checkpoint, whose architecture flags (arch) replace the command line's. Otherwise
    refuse to train over an existing ckpt.pt. Raises ValueError; writes nothing."""
    path = os.path.join(args.out, "ckpt.pt")
    if not args.resume:
        if os.path.exists(path):
            raise ValueError(f"{path} exists: pass --resume to continue that run, or choose another --out")
        return None
    ckpt = load_checkpoint(path, method, (*keys, "rng"), arch, upgrade)   # "rng": an exact resume needs every RNG
    vars(args).update({k: ckpt["args"][k] for k in arch})
    return ckpt


def restore(ckpt, world):
    """After load_states: the step to continue from, and every RNG as it was at the save (one process). Under DDP
    only rank 0's state was saved, so each rank is re-seeded from (seed, rank, step) instead."""
    if ckpt is None:
        return 0
    if world == 1:
        set_rng_state(ckpt["rng"])
    else:
        torch.manual_seed(ckpt["args"]["seed"] + dist.get_rank() + 1_000_003 * ckpt["step"])
    return ckpt["step"]


# ---- the guard against a diverged update -----------------------------------------------------------------------
EXPLODED = 1e3  # a weight this large is a blow-up, not learning (healthy weights stay below ~20; one Adam step moves ~lr)


@torch.no_grad()
def diverged(losses, grad_norms, modules):
    """Why this step must not be kept (a non-finite loss or gradient norm, or a non-finite or exploded weight after
    the update), or None. Checked after every optimizer step, before any checkpoint can be written, so a
    blown-up update never reaches ckpt.pt. Identical on every DDP rank (gradients are all-reduced)."""
    for v in losses:
        if not torch.isfinite(v).all():
            return f"loss {v.detach().float().mean().item():.4g}"
    for v in grad_norms:
        if not torch.isfinite(v):
            return f"gradient norm {v.item():.4g}"
    for m in modules:
        params = [p.detach() for p in m.parameters()]
        if params:
            top = torch.stack([p.abs().max() for p in params if p.numel()]).max()
            if not top <= EXPLODED:                              # also catches NaN
                return f"a weight of magnitude {top.item():.3g} after the update"
    return None


def stop_diverged(log, step, reason, ckpt_path):
    """The end of a run that diverged: one line on stderr (and in log.txt), exit code 1, ckpt.pt untouched."""
    kept = (f"the last good checkpoint is kept at {ckpt_path}" if os.path.isfile(ckpt_path)
            else "no checkpoint was written")
    msg = f"training diverged at step {step + 1} ({reason}): stopping before it is saved; {kept}"
    log.file(msg)
    die(msg, code=1)


# ---- lr schedule and EMA -------------------------------------------------------------------------------------
def lr_at(step, steps, peak, warmup=0, schedule="constant", lr_min=0.0):
    """Linear warm-up over `warmup` steps, then constant or a cosine decay from peak to lr_min at `steps`."""
    lo = min(lr_min, peak)
    cos = 0.5 * (1 + math.cos(math.pi * step / steps)) if schedule == "cosine" else 1.0
    return min(1.0, (step + 1) / max(1, warmup)) * (lo + (peak - lo) * cos)


def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


@torch.no_grad()
def ema_update(ema, model, decay, step):
    """EMA of the sampling weights with a warm-up: decay min(decay, (1 + n) / (10 + n)), so that a short run
    already samples well from it; buffers are copied."""
    d = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - d)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


# ---- the log ----------------------------------------------------------------------------------------------
class Log:
    """Rank 0's log: each line to stdout and OUT/log.txt. progress() adds steps/s and the ETA measured over training
    time only: time spent inside `with log.paused():` (sampling, scoring) is left out."""

    def __init__(self, out, master, step, steps, every):
        self.path, self.master, self.steps, self.every = os.path.join(out, "log.txt"), master, steps, every
        self.step0, self.t0, self.t_last = step, time.time(), time.time()

    def file(self, msg):
        if self.master:
            with open(self.path, "a") as f:
                f.write(msg + "\n")

    def __call__(self, msg):
        if self.master:
            print(msg, flush=True)
            self.file(msg)

    def due(self, step):
        return time.time() - self.t_last > self.every or step == self.steps

    def progress(self, step, text):
        rate = (step - self.step0) / max(time.time() - self.t0, 1e-9)
        eta = (self.steps - step) / max(rate, 1e-9)
        self(f"step {step:>7d}/{self.steps} | {text} | {rate:.2f} steps/s | eta {int(eta // 60)}m{int(eta % 60):02d}s")
        self.t_last = time.time()

    @contextlib.contextmanager
    def paused(self):
        t = time.time()
        try:
            yield
        finally:
            self.t0 += time.time() - t


def progress(done, total, t0, what="samples", every=5.0, _last={}):
    """A sampler's progress line every `every` seconds (done of total, per second, ETA); nothing for short runs.
    t0 is when this run of the loop began; the first line comes `every` seconds after it."""
    now = time.time()
    run_t0, last = _last.get(what, (None, None))
    if run_t0 != t0:                                       # a new run of the loop: its clock starts at t0
        last = t0
    if done < total and now - last > every:
        rate = done / max(now - t0, 1e-9)
        print(f"  sampling: {done}/{total} {what} | {rate:.3g}/s | eta {int((total - done) / max(rate, 1e-9))}s",
              flush=True)
        last = now
    _last[what] = (t0, last)


# ---- samples, scores and metrics -----------------------------------------------------------------------------
def real_row(x, y, n=10):
    """n training images for the real row under a grid, cycling through the classes: one of each first."""
    per_class = [torch.nonzero(y == c).flatten() for c in torch.unique(y)]          # indices of each class
    picks = [per_class[i % len(per_class)][i // len(per_class)] for i in range(n)
             if i // len(per_class) < len(per_class[i % len(per_class)])]
    return x[torch.stack(picks)] if picks else x[:n]


def reference(a, x, y):
    """What a picture draws beside the samples: held-out points under a scatter, or a real row of images."""
    return load(a["data"], "test", seed=a["seed"])[0] if is_2d(a["data"]) else real_row(x, y)


def save_samples(a, x, path, real=None, nrow=None):
    """A PNG grid of images (real row at the bottom) or a scatter of 2-D points over the real data."""
    if is_2d(a["data"]):
        real = load(a["data"], "test", seed=a["seed"])[0] if real is None else real
        return save_scatter(x, path, a["data"], real=real)
    nrow = nrow or math.ceil(math.sqrt(len(x)))
    save_grid(x, path, nrow=nrow, real=real[:nrow] if real is not None else None)


def save_npz(x, path, labels=None):
    """Samples as a .npz in the layout FID tools read: uint8 NHWC images (2-D points as float32) in arr_0,
    class labels (if any) in arr_1. Written atomically."""
    arr = x if x.dtype != torch.float32 or x.dim() == 2 else _to_uint8(x).permute(0, 2, 3, 1)
    tmp = path[:-4] + f".{os.getpid()}.tmp.npz"
    np.savez(tmp, arr_0=arr.numpy(), **(dict(arr_1=labels.numpy()) if labels is not None else {}))
    os.replace(tmp, path)


def score(a, x, labels=None):
    """The final scores: energy distance (+ modes) on 2-D data; legibility and class coverage under the cached
    classifier for labelled images, and with `labels` label_acc, the % classified as the class asked for.
    Scores that need the real data are skipped, with one note on stderr, when it is not available."""
    if is_2d(a["data"]):
        return score_2d(x, a["data"], seed=a["seed"])
    try:
        scores = score_images(x, a["data"], a["image_size"], a["data_dir"], a["classes"])
        if scores:
            scores.update(fd_scores(a, x))
        if scores and labels is not None:
            net = classifier(a["data"], a["image_size"], a["data_dir"],
                             tuple(map(str, a["classes"])) if a["classes"] else None)[0]
            scores["label_acc"] = 100 * (net(x.float().clamp(-1, 1)).argmax(1) == labels).double().mean().item()
        return scores
    except (ValueError, OSError) as e:
        sys.stderr.write(f"note: scores skipped, the real data is not available ({str(e).splitlines()[0][:160]})\n")
        return {}


def fd_scores(a, x):
    """'fd': the Frechet distance of samples x to the real test split in the features of the classifier that
    score_images uses (the run's classes); 'fd_floor': the same for as many real training images (seeded), which
    is what a perfect sampler would score with this many samples."""
    test = to_float(load(a["data"], "test", a["image_size"], a["data_dir"], a["classes"], a["seed"])[0])
    train = load(a["data"], "train", a["image_size"], a["data_dir"], a["classes"], a["seed"])[0]
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(a["seed"]))[:len(x)]
    feat = functools.partial(features, name=a["data"], image_size=a["image_size"], data_dir=a["data_dir"],
                             classes=a["classes"])
    ref = feat(test)
    return {"fd": frechet(feat(x), ref), "fd_floor": frechet(feat(to_float(train[pick])), ref)}


def finish(a, method, sampler, nfe, sec100, n, scores, path, log, extra):
    """Write metrics.json (the same keys in every method) and print the final line."""
    m = dict(method=method, data=a["data"], sampler=sampler, nfe=nfe, sec_per_100=round(sec100, 4), n_samples=n,
             **extra, **scores)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(m, f, indent=1)
    os.replace(tmp, path)
    shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items())
    log(f"done | {sampler} | NFE {nfe} per sample | {sec100:.2f} s per 100 samples" + (f" | {shown}" if shown else ""))
    return m


def sample_out(args, path, default_out):
    """Where --sample-only writes: --out, or the checkpoint's folder when only --ckpt was given."""
    return os.path.dirname(path) or "." if args.ckpt and args.out == default_out else args.out


def peak_memory_mb():
    """The process's peak memory so far, in MiB: where CUDA ran, the most its tensors held (max_memory_allocated,
    without the CUDA context and cache); on the CPU the peak resident set of the whole process (Python, torch, the
    data and checkpoint included). For --sample-only, which only loads a checkpoint and samples, that is what
    sampling needed; after training, the training peak. None where unknown (Apple mps, Windows)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    if torch.backends.mps.is_available():                        # its GPU memory is not in the resident set
        return None
    try:
        import resource                                          # POSIX only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss    # KiB on Linux, bytes on macOS
    return round(peak / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), 1)


def write_outputs(a, method, x, info, out, log, extra, real=None, tag="", save_npz_too=False, labels=None, nrow=None):
    """The end of a run or of --sample-only: samples{_tag}.png, optionally samples{_tag}.npz, and
    metrics{_tag}.json with the scores. info: generate()'s sampler, nfe and sec_per_100. peak_mem_mb is
    measured here, after sampling and before scoring (peak_memory_mb: after training it includes training)."""
    extra = dict(extra, peak_mem_mb=peak_memory_mb())
    suffix = f"_{tag}" if tag else ""
    os.makedirs(out, exist_ok=True)
    save_samples(a, x, os.path.join(out, f"samples{suffix}.png"), real, nrow)
    if save_npz_too:
        save_npz(x, os.path.join(out, f"samples{suffix}.npz"), labels)
    scores = info.get("scores") or score(a, x, labels)
    return finish(a, method, info["sampler"], info["nfe"], info["sec_per_100"], len(x), scores,
                  os.path.join(out, f"metrics{suffix}.json"), log, extra)


def clip_grad(module, max_norm):
    """Clip the gradient norm to max_norm (0: no clipping) and return the norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm if max_norm > 0 else float("inf"))


# ---- pieces that more than one method file can use ----------------------------------------------------------
def raise_first(checks):
    """A script's own flag checks: ValueError(message) for the first (failed, message) pair that failed."""
    for failed, message in checks:
        if failed:
            raise ValueError(message)


def build_unet(a, in_ch, **kw):
    """The shared UNet for in_ch-channel images, shaped by the model flags of add_shared_args (kw: out_ch, ...)."""
    from unet import UNet                                        # imported here: loading data needs no network
    return UNet(in_ch=in_ch, ch=a["ch"], ch_mult=tuple(a["ch_mult"]), num_res_blocks=a["num_res_blocks"],
                attn_res=tuple(a["attn_res"]), dropout=a["dropout"], temb_dim=a["temb_dim"],
                image_size=a["image_size"], **kw)


def points_box(x, margin=0.05):
    """[lo, hi] per axis of 2-D points x (N, D), as lists (for a run's args): their range widened by margin of it."""
    lo, hi = x.min(0).values, x.max(0).values
    return [(lo - margin * (hi - lo)).tolist(), (hi + margin * (hi - lo)).tolist()]


def pool_scores(all_scores):
    """One score dict from several sampling runs: the first run's scores, with a 2-D energy distance pooled over
    all of them (energy = the mean, energy_std, energy_min, energy_max, runs)."""
    scores = dict(all_scores[0])
    if "energy" in scores:
        e = torch.tensor([m["energy"] for m in all_scores], dtype=torch.float64)
        scores.update(energy=e.mean().item(), energy_std=e.std().item() if len(e) > 1 else 0.0,
                      energy_min=e.min().item(), energy_max=e.max().item(), runs=len(e))
    return scores


def load_ema(path, method, build, keys, arch, device="cpu"):
    """(model, cfg) from a method's ckpt.pt (load_checkpoint's keys and arch): build(args) holding the EMA weights,
    in eval mode on `device`, and the run's settings with its step."""
    ckpt = load_checkpoint(path, method, keys, arch)
    model = build(ckpt["args"])
    load_states(ckpt, path, ema=model)
    return model.to(device).eval(), dict(ckpt["args"], step=ckpt["step"])


def save_side_by_side(left, right, path):
    """Two image sets (e.g. two models' samples) as square grids side by side, a blank column between."""
    r = int(math.sqrt(min(len(left), len(right))))
    grid = [left[:r * r].view(r, r, *left.shape[1:]), torch.ones(r, 1, *left.shape[1:]),
            right[:r * r].view(r, r, *left.shape[1:])]
    save_grid(torch.cat(grid, 1).flatten(0, 1), path, nrow=2 * r + 1)


def write_compare(out, title, results, two_d):
    """A --compare table: print title and the markdown table of results ({"model | sampler": nfe and scores}):
    energy mean +- std, range and floor for 2-D data, legibility and classes covered for images. Writes the
    table to out/compare.md and results to out/compare.json; returns the table's lines."""
    head = ("| model | sampler | NFE | energy (mean +- std) | min..max | floor |" if two_d else
            "| model | sampler | NFE | legible % | classes covered |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, r in results.items():
        lines.append(f"| {key} | {r['nfe']} | " + (f"{r['energy']:.4f} +- {r['energy_std']:.4f} (n={r['runs']}) | "
                     f"{r['energy_min']:.4f}..{r['energy_max']:.4f} | {r['energy_floor']:.4f} |" if two_d else
                     f"{r.get('legible', float('nan')):.1f} | {r.get('classes_covered', '-')} |"))
    print(title + "\n" + "\n".join(lines))
    for name, text in (("compare.md", "\n".join(lines) + "\n"), ("compare.json", json.dumps(results, indent=1))):
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
    return lines


# ---- more shared pieces: 8-bit values, labels and guidance, training-loop steps, --eval output ----------------
def to_8bit(a, x):
    """A float batch (images in [-1, 1], swirl points standardised) -> its exact 8-bit values (int64, same shape)."""
    if is_2d(a["data"]):
        mean, std = (v.to(x.device) for v in swirl_scale())
        return (x * std + mean).round().long().clamp(0, 255)
    return ((x + 1) * 127.5).round().long().clamp(0, 255)


def swirl_grid():
    """The swirl's 256 values per axis, (2, 256): (k - mean) / std for the 8-bit values k = 0..255 (swirl_scale)."""
    mean, std = swirl_scale()
    return (torch.arange(256.0)[None] - mean[:, None]) / std[:, None]


def grid_labels(names, labels, n):
    """A conditional grid's labels: a row per class of `labels` (names or indices; default all), n // rows each."""
    chosen = []
    for c in labels or names:
        if c not in names and not (str(c).isdigit() and int(c) < len(names)):
            raise ValueError(f"unknown label '{c}': choose from {', '.join(names)} or an index 0..{len(names) - 1}")
        chosen.append(names.index(c) if c in names else int(c))
    return torch.tensor(chosen).repeat_interleave(max(1, n // len(chosen)))


def check_labels(cfg, labels):
    """ValueError for --labels given to an unconditional checkpoint, or naming a class the model does not have."""
    if labels and not cfg["cond"]:
        raise ValueError("--labels needs a conditional checkpoint (trained with --cond)")
    if cfg["cond"]:
        grid_labels(cfg["class_names"], labels, 1)


def guidance_tag(cfg):
    """A sampler name's suffix for a conditional model: _w1.0 (the guidance w), then _labels3-5 for --labels."""
    if not cfg["cond"]:
        return ""
    return f"_w{cfg['guidance']}" + ("_labels" + "-".join(map(str, cfg["labels"])) if cfg.get("labels") else "")


def add_guidance_args(group):
    """Classifier-free guidance's flags in an argparse group: --cond, --p-uncond, --guidance and --labels."""
    group.add_argument("--cond", action=argparse.BooleanOptionalAction, default=False,
                       help="class-conditional (+ null)")
    group.add_argument("--p-uncond", type=float, default=0.2, help="with --cond: label dropout to the null class")
    group.add_argument("--guidance", type=float, default=1.0, help="with --cond: w in (1 + w) eps(c) - w eps(null)")
    group.add_argument("--labels", nargs="+", default=None, help="with --cond: the grid's classes, a row each")


def start_training(args, method, keys, arch, upgrade=None):
    """(rank, world, device, ckpt, (x, y, class_names)): DDP, seeds, resume_or_refuse, then the training split."""
    rank, world, device = setup_ddp(args.device)
    seed_all(args.seed + rank)
    ckpt = resume_or_refuse(args, method, keys, arch, upgrade)
    return rank, world, device, ckpt, load(args.data, "train", args.image_size, args.data_dir, args.classes, args.seed)


def resume_states(ckpt, world, path, **states):
    """load_states (when resuming), then restore(): the step to continue from, every state and RNG as saved."""
    if ckpt is not None:
        load_states(ckpt, path, **states)
    return restore(ckpt, world)


def run_header(method, a, x, model, device, world, step, details):
    """A training log's first line: method, data, parameters, device, the method's `details`, batch and steps."""
    n = sum(p.numel() for p in model.parameters()) / 1e6
    return (f"{method} | data {a['data']} {tuple(x.shape)} | {n:.2f}M params | device {device} x{world} | {details} "
            f"| batch {a['batch_size']} x{world} | steps {step}..{a['steps']}")


def optimizer_step(opt, loss, model, grad_clip, log, step, ckpt_path):
    """Backward, clip and step; a diverged update stops the run (stop_diverged) before anything can save it."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_grad(model, grad_clip)
    opt.step()
    bad = diverged([loss], [grad_norm], [model])
    if bad:
        stop_diverged(log, step, bad, ckpt_path)


def sample_grid(args, a, step, rank, log, real, draw):
    """Every --sample-every steps but the last, rank 0 saves samples_STEP.png of draw(info), untimed (info: nrow)."""
    if rank == 0 and args.sample_every and step % args.sample_every == 0 and step < args.steps:
        with log.paused():                                       # sampling is not training time
            info = {}
            x = draw(info)
            save_samples(a, x, os.path.join(args.out, f"samples_{step:07d}.png"), real, info.get("nrow"))


def timed_batches(draw, n, batch):
    """draw(i, b) for the batches of b <= batch of n samples from i, concatenated on the CPU, and seconds per 100
    (a progress line every few seconds between batches)."""
    t0, xs = time.time(), []
    for i in range(0, n, batch):
        xs.append(draw(i, min(batch, n - i)).cpu())
        progress(i + len(xs[-1]), n, t0, "samples")
    return torch.cat(xs), 100 * (time.time() - t0) / n


def mean_over_test(a, terms, batch=200):
    """Means over a run's test split of terms(x, y), per-example tensors summed in float64 (x float, on the CPU)."""
    x, y, _ = load(a["data"], "test", a["image_size"], a["data_dir"], a["classes"], a["seed"])
    sums = 0
    for i in range(0, len(x), batch):
        sums = sums + torch.stack([v.double().sum().cpu() for v in terms(to_float(x[i:i + batch]), y[i:i + batch])])
    return (sums / len(x)).tolist()


def write_eval(out, method, cfg, metrics, note=""):
    """--eval's end: print the metrics on one line (then `note`), write OUT/metrics_eval.json; returns metrics."""
    print(" | ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + note)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics_eval.json"), "w") as f:
        json.dump(dict(method=method, data=cfg["data"], step=cfg["step"], **metrics), f, indent=1)
    return metrics
