"""VDM: Variational Diffusion Models (Kingma, Salimans, Poole & Ho 2021, arXiv 2107.00630).

Idea: a diffusion model trained on its variational bound, reported in bits per dimension. The forward
process q(z_t | x) = N(alpha_t x, sigma_t^2 I) is set by one function gamma(t) = -log SNR(t), with
alpha_t^2 = sigmoid(-gamma_t) and sigma_t^2 = sigmoid(gamma_t) (Sec. 3.1-3.2); gamma can be fixed, have
learned endpoints, or be a learned monotone network. The negative ELBO is the sum of three terms (Sec. 3.5):
a 256-way reconstruction term -log p(x | z_0) on the 8-bit data, the prior KL(q(z_1 | x) || N(0, I)) and
the diffusion loss, in discrete time (Sec. 4) or continuous time, where it is 0.5 E[gamma'(t) ||eps -
eps_hat||^2] and depends on the schedule only through its endpoints (Sec. 5). Sampling is ancestral:
p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t)) (Sec. 3.3), then z_0 is decoded by the argmax of the 256 logits.

Run:   python vdm.py                                  # glyphs 16x16, CPU-sized model, ~13 min on 2 cores
       python vdm.py --cond --out runs/vdm_cond       # class-conditional, guidance w = 1, one row per digit
       python vdm.py --data swirl                     # 2-D 8-bit swirl with the MLP
       python vdm.py --eval --out runs/vdm            # test-set bits/dim of a checkpoint, term by term
       python vdm.py --sample-only --out runs/vdm --sample-steps 200 --save-npz

t convention: t is continuous in [0, 1] (gamma(0) = gamma_0 is the least noise, gamma(1) = gamma_1 the most).
With --T N the diffusion loss is the discrete one on the grid t in {1/N, ..., 1} with s = t - 1/N. The
sampler walks t_i = i/S for i = S..1 (S = --sample-steps, default T, or 1000 for a continuous model).
The network sees gamma_t rescaled to [0, 1] by the initial endpoints (--gamma-min, --gamma-max), times 1000.

Data: images enter as their exact 8-bit values k, and x = 2 (k + 0.5) / 256 - 1 (the bin centres). For the
2-D swirl, whose points are standardised 8-bit values, the 256 bins sit at (k - mean) / std per axis
(data.swirl_scale()), i.e. the diffusion runs in the standardised coordinates, as the VDM 2-D example does,
and samples decode to one of those 256 x 256 grid points.
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from unet import MLP, UNet


# ----------------------------------------------------------------------------------------------------
# Schedule: gamma(t) = -log SNR(t) = b + |w| s(t), with s(0) = 0, s(1) = 1 and s increasing (Sec. 3.2)
class Schedule(nn.Module):
    """gamma(t) with gamma_0 = b and gamma_1 = b + |w| as its endpoints.

    fixed:  s(t) = t, b and w fixed (linear from --gamma-min to --gamma-max).
    scalar: s(t) = t, b and w learned (the paper's learnable linear schedule, gamma = b + |w| t).
    net:    s(t) = (f(t) - f(0)) / (f(1) - f(0)) with the monotone network f(t) = l1(t) + l3(phi(l2(l1(t))))
            (positive weights, phi = sigmoid, 1024 units): its endpoints are exactly the learned gamma_0 and
            gamma_1, and the network only shapes the interior (the public JAX code skips this normalisation).
    """

    def __init__(self, kind, gamma_min=-13.3, gamma_max=5.0, hidden=1024):
        super().__init__()
        self.kind = kind
        b, w = torch.tensor(float(gamma_min)), torch.tensor(float(gamma_max - gamma_min))
        if kind == "fixed":
            self.register_buffer("b", b)
            self.register_buffer("w", w)
        else:
            self.b, self.w = nn.Parameter(b), nn.Parameter(w)
        if kind == "net":
            self.l1, self.l2, self.l3 = nn.Linear(1, 1), nn.Linear(1, hidden), nn.Linear(hidden, 1, bias=False)
            with torch.no_grad():  # start close to linear: l1 = identity, a small sigmoid term on top
                self.l1.weight.fill_(1.0)
                self.l1.bias.zero_()
                self.l3.weight.uniform_(0, 1 / hidden)

    def endpoints(self):
        """(gamma_0, gamma_1)."""
        return self.b, self.b + self.w.abs()

    def shape(self, t):
        """s(t) in [0, 1], increasing, s(0) = 0 and s(1) = 1 exactly."""
        if self.kind != "net":
            return t
        u = torch.cat([t, t.new_tensor([0.0, 1.0])])[:, None]             # (B + 2, 1): t, then 0 and 1
        h = F.linear(u, self.l1.weight.abs(), self.l1.bias)               # |weights| keep f increasing
        f = (h + F.linear(torch.sigmoid(F.linear(h, self.l2.weight.abs(), self.l2.bias)),
                          self.l3.weight.abs()))[:, 0]                    # (B + 2,)
        s = (f[:-2] - f[-2]) / (f[-1] - f[-2])
        return torch.where(t == 0, 0.0, torch.where(t == 1, 1.0, s))      # exact endpoints, no rounding

    def forward(self, t):
        return self.b + self.w.abs() * self.shape(t)


def gamma_and_slope(schedule, t, create_graph=True):
    """gamma(t), gamma'(t) by autograd (so a learned schedule gets gradients through gamma'), and the
    interior's tensors (s(t), s'(t)) that --var-min hooks. Works under no_grad too (evaluation)."""
    with torch.enable_grad():
        t = t.detach().requires_grad_(True)
        s = schedule.shape(t)
        ds, = torch.autograd.grad(s.sum(), t, create_graph=create_graph)  # each s_i depends only on t_i
        w = schedule.w.abs()
        gamma, slope = schedule.b + w * s, w * ds
    if not create_graph:
        gamma, slope = gamma.detach(), slope.detach()
    return gamma, slope, (s, ds)


def alpha_sigma(gamma):
    """alpha = sqrt(sigmoid(-gamma)), sigma = sqrt(sigmoid(gamma)) (Sec. 3.2), so alpha^2 + sigma^2 = 1."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


# ----------------------------------------------------------------------------------------------------
# Networks around the diffusion: the score model eps_hat(z_t; gamma_t), and the --latent coder
class _Res(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice, with a skip: the block of the --latent encoder and decoder."""

    def __init__(self, ch):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                  nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class VDM(nn.Module):
    """Everything with parameters: the score network, the schedule, the bin centres (buffer (C, 256)) and,
    with --latent, the encoder x -> e in (-1, 1) and decoder z_0 / alpha_0 -> 256 logits per pixel.
    forward(k, y) returns the bound's per-example terms, so DDP sees a single module."""

    def __init__(self, net, schedule, centres, freqs=(), gamma_range=(-13.3, 5.0), latent_ch=0):
        super().__init__()
        self.net, self.gamma = net, schedule
        self.register_buffer("centres", centres)
        self.freqs, self.gamma_range = tuple(freqs), gamma_range
        self.encoder = self.decoder = None
        if latent_ch:
            C = centres.shape[0]
            self.encoder = nn.Sequential(nn.Conv2d(C, latent_ch, 3, padding=1), _Res(latent_ch), _Res(latent_ch),
                                         nn.GroupNorm(8, latent_ch), nn.SiLU(), nn.Conv2d(latent_ch, C, 3, padding=1),
                                         nn.Tanh())
            self.decoder = nn.Sequential(nn.Conv2d(C, latent_ch, 3, padding=1), _Res(latent_ch), _Res(latent_ch),
                                         nn.GroupNorm(8, latent_ch), nn.SiLU(),
                                         nn.Conv2d(latent_ch, C * 256, 3, padding=1))

    def forward(self, k, y=None, T=0, var_min=False, dtype="float32"):
        return elbo_terms(self, k, y, T, var_min=var_min, dtype=dtype)


def eps_model(model, z, gamma, y=None, dtype="float32"):
    """eps_hat(z_t; gamma_t) = z_t + net([z_t, sin/cos(2^n pi z_t)], 1000 * gamma rescaled to [0, 1], y)
    (Sec. 3.4: Fourier features of the input at the finest frequencies; conditioned on gamma, not t; the
    zero-initialised last layer makes a fresh model output z_t). Only the network runs under autocast."""
    feats = [f(2.0 ** n * math.pi * z) for n in model.freqs for f in (torch.sin, torch.cos)]
    h = torch.cat([z] + feats, dim=1)                                     # (B, C (1 + 2 n_freqs), ...)
    lo, hi = model.gamma_range
    with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        out = model.net(h, 1000.0 * (gamma - lo) / (hi - lo), y).float()
    return z + out


def guided_eps(model, z, gamma, y=None, w=0.0, dtype="float32"):
    """Classifier-free guidance: eps = (1 + w) eps(z, c) - w eps(z, null); w = 0 is the conditional model."""
    if y is None or w == 0:
        return eps_model(model, z, gamma, y, dtype)
    both = eps_model(model, torch.cat([z, z]), torch.cat([gamma, gamma]), torch.cat([y, torch.full_like(y, -1)]),
                     dtype)                                               # one batch of 2B: (c, null)
    eps_c, eps_null = both.chunk(2)
    return (1 + w) * eps_c - w * eps_null


def decoder_logits(model, u, gamma0):
    """The 256 logits of p(x | z_0) at u = z_0 / alpha_0, shape (*u.shape, 256). Plain VDM: a Gaussian of
    variance exp(gamma_0) around u discretised onto the bin centres, -0.5 exp(-gamma_0) (u - c_k)^2."""
    if model.decoder is not None:
        B, C, H, W = u.shape
        return model.decoder(u).view(B, C, 256, H, W).permute(0, 1, 3, 4, 2)  # (B, C, H, W, 256)
    c = model.centres.view(1, model.centres.shape[0], *[1] * (u.dim() - 2), 256)
    return -0.5 * torch.exp(-gamma0) * (u[..., None] - c) ** 2


def recon_nll(model, k, u, gamma0, window=True):
    """-log p(x = k | z_0) per element: -log_softmax of the 256 logits at the true bin.

    For the Gaussian decoder only the bins within 8 std (exp(gamma_0 / 2)) of u carry mass (the rest add
    < e^-32 relative), so the log-sum-exp runs over that window of the evenly spaced bins: exact in float32,
    and at gamma_0 = -13.3 a few bins instead of 256 (the full softmax costs as much as the UNet here)."""
    chan = torch.arange(k.shape[1], device=k.device).view(1, -1, *[1] * (k.dim() - 2))
    c = model.centres
    delta = (c[:, 1] - c[:, 0]).min().item()                              # bin spacing (uniform per channel)
    W = math.ceil(8 * math.exp(0.5 * gamma0.item()) / delta) + 1
    if model.decoder is not None or not window or 2 * W + 1 >= 256:
        return -F.log_softmax(decoder_logits(model, u, gamma0), dim=-1).gather(-1, k[..., None]).squeeze(-1)
    prec = torch.exp(-gamma0)
    c0, step = c[:, 0].view(chan.shape), (c[:, 1] - c[:, 0]).view(chan.shape)
    j0 = ((u.detach() - c0) / step).round().clamp(0, 255).long()         # nearest bin
    j = j0[..., None] + torch.arange(-W, W + 1, device=u.device)          # (..., 2W + 1) bins around it
    inside = (j >= 0) & (j <= 255)
    logits = -0.5 * prec * (u[..., None] - c[chan[..., None], j.clamp(0, 255)]) ** 2
    lse = torch.logsumexp(logits.masked_fill(~inside, -math.inf), dim=-1)
    return 0.5 * prec * (u - c[chan, k]) ** 2 + lse


# ----------------------------------------------------------------------------------------------------
# The bound (Sec. 3.5): -log p(x) <= L_recon + L_prior + L_diff, each in bits per data dimension
def diffusion_weight(gamma_t, gamma_s, T):
    """Discrete-time weight T (SNR(s) / SNR(t) - 1) = T expm1(gamma_t - gamma_s) of ||eps - eps_hat||^2 (Sec. 4);
    expm1 keeps the small difference exact (1000 expm1(18.3 / 1000) = 18.47, not 18.3)."""
    return T * torch.expm1(gamma_t - gamma_s)


def elbo_terms(model, k, y=None, T=0, antithetic=True, var_min=False, dtype="float32"):
    """Per-example (recon, prior, diff) in bits/dim, each (B,), for 8-bit data k (B, C, H, W) or (B, 2).

    recon: -log p(x | z_0), z_0 / alpha_0 = x + exp(gamma_0 / 2) eps, 256-way softmax over the bins.
    prior: KL(q(z_1 | x) || N(0, I)) = 0.5 sum (sigma_1^2 + alpha_1^2 x^2 - log sigma_1^2 - 1).
    diff:  continuous (T = 0, Sec. 5): 0.5 gamma'(t) ||eps - eps_hat(z_t; gamma_t)||^2, gamma' by autograd;
           discrete (T = N, Sec. 4): 0.5 N expm1(gamma_t - gamma_s) ||eps - eps_hat||^2, t on {1/N..1}.
    Times are antithetic: one u ~ U(0, 1) per batch, t_i = (u + i / B) mod 1 (lower variance).
    var_min: the net schedule's interior gets 2 L_diff dL_diff/d eta instead of dL_diff/d eta (Sec. 5.3).
    """
    B, D = k.shape[0], k[0].numel()
    dims = tuple(range(1, k.dim()))
    chan = torch.arange(k.shape[1], device=k.device).view(1, -1, *[1] * (k.dim() - 2))
    x = model.centres[chan, k]                                            # bin centres, same shape as k
    e = model.encoder(x) if model.encoder is not None else x              # the diffused variable
    gamma0, gamma1 = model.gamma.endpoints()

    # L_recon: sample z_0 / alpha_0 directly, score the true bin
    u = e + torch.exp(0.5 * gamma0) * torch.randn_like(e)
    recon = recon_nll(model, k, u, gamma0).sum(dims)

    # L_prior, written with sigma_1^2 - 1 = -alpha_1^2 and -log sigma_1^2 = softplus(-gamma_1) for precision
    a2 = torch.sigmoid(-gamma1)
    prior = 0.5 * (a2 * e ** 2 + F.softplus(-gamma1) - a2).sum(dims)

    # L_diff
    t = torch.rand(1 if antithetic else B, device=k.device)
    if antithetic:
        t = (t + torch.arange(B, device=k.device) / B) % 1
    if T:
        t = (torch.floor(t * T) + 1) / T                                  # uniform on {1/T, ..., 1}
    gamma_t, slope, interior = gamma_and_slope(model.gamma, t, create_graph=torch.is_grad_enabled())
    alpha_t, sigma_t = alpha_sigma(gamma_t.view(-1, *[1] * len(dims)))
    eps = torch.randn_like(e)
    z_t = alpha_t * e + sigma_t * eps                                     # q(z_t | x), Sec. 3.1
    mse = ((eps - eps_model(model, z_t, gamma_t, y, dtype)) ** 2).sum(dims)
    weight = diffusion_weight(gamma_t, model.gamma(t - 1 / T), T) if T else slope
    diff = 0.5 * weight * mse

    bpd = 1 / (D * math.log(2))
    if var_min and torch.is_grad_enabled():
        # Sec. 5.3: in continuous time E[L_diff] depends only on the endpoints, so the interior eta may instead
        # minimise the variance, i.e. E[L_diff^2], whose gradient is E[2 L_diff dL_diff/d eta]. All of eta's
        # gradient flows through s(t_i) and s'(t_i): scaling it there by 2 L_diff_i is a custom backward
        # that costs nothing extra; the endpoints (b, w) and the network still get the ELBO gradient.
        scale = 2 * (diff * bpd).detach()
        for v in interior:
            v.register_hook(lambda g: g * scale)
    return recon * bpd, prior * bpd, diff * bpd


# ----------------------------------------------------------------------------------------------------
# Sampler (Sec. 3.3): ancestral steps z_t -> z_s with p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t; t))
def sample_step(z_t, eps_hat, gamma_t, gamma_s, noise):
    """z_s = (alpha_s / alpha_t) (z_t - sigma_t c eps_hat) + sigma_s sqrt(c) noise, c = -expm1(gamma_s - gamma_t)
    = 1 - SNR(t) / SNR(s): the posterior q(z_s | z_t, x_hat) written in eps_hat. gamma_t, gamma_s: floats."""
    gt, gs = torch.tensor(float(gamma_t), dtype=torch.float64), torch.tensor(float(gamma_s), dtype=torch.float64)
    (alpha_t, sigma_t), (alpha_s, sigma_s) = alpha_sigma(gt), alpha_sigma(gs)
    c = -torch.expm1(gs - gt)
    return (alpha_s / alpha_t).item() * (z_t - (sigma_t * c).item() * eps_hat) + (sigma_s * c.sqrt()).item() * noise


@torch.no_grad()
def sample(model, shape, S, y=None, w=0.0, generator=None, device="cpu", dtype="float32"):
    """S ancestral steps from z_1 ~ N(0, I) on t_i = i / S, then the 8-bit k by the argmax of p(x | z_0).
    Only the current z is kept: memory does not grow with S. Returns k (int64, `shape`)."""
    gamma = model.gamma(torch.linspace(0, 1, S + 1, device=device)).double().cpu()   # gamma(t_i), i = 0..S
    z = torch.randn(shape, generator=generator, device=device)
    for i in range(S, 0, -1):
        g_t = torch.full((shape[0],), gamma[i].item(), device=device)
        eps_hat = guided_eps(model, z, g_t, y, w, dtype)
        z = sample_step(z, eps_hat, gamma[i], gamma[i - 1], torch.randn(shape, generator=generator, device=device))
    alpha0 = alpha_sigma(gamma[0])[0].item()
    return decoder_logits(model, z / alpha0, torch.tensor(gamma[0].item(), device=device)).argmax(-1)


# ----------------------------------------------------------------------------------------------------
# Plumbing: device, data mapping, model, checkpoint (the same shape in every method file)
def pick_device(name):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def to_int(a, x):
    """A float batch from data.batches -> its exact 8-bit values k (int64, same shape)."""
    if data.is_2d(a["data"]):
        mean, std = (v.to(x.device) for v in data.swirl_scale())
        return (x * std + mean).round().long().clamp(0, 255)
    return ((x + 1) * 127.5).round().long().clamp(0, 255)


def from_int(a, model, k):
    """8-bit k -> what data.save_grid / score_2d take: images k / 127.5 - 1, swirl its standardised point."""
    if data.is_2d(a["data"]):
        return model.centres.cpu()[torch.arange(2)[None], k.cpu()]
    return data.to_float(k.cpu().to(torch.uint8))


def build_model(a):
    """The VDM container: UNet (images) or MLP (swirl) on Fourier-featured input, the schedule, the bins."""
    C, n = a["channels"], len(a["fourier"])
    if data.is_2d(a["data"]):
        mean, std = data.swirl_scale()
        centres = (torch.arange(256.0)[None] - mean[:, None]) / std[:, None]       # (2, 256)
        net = MLP(in_dim=2 * (1 + 2 * n), out_dim=2, hidden=a["hidden"], layers=a["layers"])
    else:
        centres = ((2 * torch.arange(256.0) + 1) / 256 - 1).repeat(C, 1)       # (C, 256): 2 (k + 0.5) / 256 - 1
        net = UNet(in_ch=C * (1 + 2 * n), out_ch=C, ch=a["ch"], ch_mult=tuple(a["ch_mult"]),
                   num_res_blocks=a["num_res_blocks"], attn_res=tuple(a["attn_res"]), dropout=a["dropout"],
                   temb_dim=a["temb_dim"], image_size=a["image_size"],
                   num_classes=len(a["class_names"]) if a["cond"] else 0)
    schedule = Schedule(a["schedule"], a["gamma_min"], a["gamma_max"])
    return VDM(net, schedule, centres, a["fourier"], (a["gamma_min"], a["gamma_max"]),
               latent_ch=a["ch"] if a["latent"] else 0)


def save_checkpoint(path, obj):
    """Write atomically: a crash mid-write never leaves a half-written ckpt.pt."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path):
    """Load a vdm checkpoint or raise ValueError with one clear line."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}") from None
    if not isinstance(ckpt, dict) or ckpt.get("method") != "vdm":
        found = ckpt.get("method") if isinstance(ckpt, dict) else None
        raise ValueError(f"{path} is not a vdm checkpoint (method: {found})")
    return ckpt


def grid_labels(a, n):
    """Labels for a conditional grid: one row per class of --labels (default all), n // classes per row."""
    names = a["class_names"]
    chosen = []
    for c in a.get("labels") or names:
        if c in names:
            chosen.append(names.index(c))
        elif str(c).isdigit() and int(c) < len(names):
            chosen.append(int(c))
        else:
            raise ValueError(f"unknown label '{c}': choose from {', '.join(names)} or an index 0..{len(names) - 1}")
    per = max(1, n // len(chosen))
    return torch.tensor(chosen).repeat_interleave(per), per


@torch.no_grad()
def generate(a, model, n, device, dtype="float32", seed=0, batch=500):
    """Sample n items from fixed noise (seed). Returns (samples on cpu, labels or None, NFE per sample,
    seconds per 100 samples); a conditional model gets --labels rows and guidance w = --guidance."""
    S = a.get("sample_steps") or a["T"] or 1000
    shape = (2,) if data.is_2d(a["data"]) else (a["channels"], a["image_size"], a["image_size"])
    labels = grid_labels(a, n)[0] if a["cond"] else None
    n = len(labels) if labels is not None else n
    w = a["guidance"] if a["cond"] else 0.0
    g = torch.Generator(device).manual_seed(seed)
    t0, out = time.time(), []
    for i in range(0, n, batch):
        y = labels[i:i + batch].to(device) if labels is not None else None
        k = sample(model, (min(batch, n - i),) + shape, S, y, w, g, device, dtype)
        out.append(from_int(a, model, k))
    sec = time.time() - t0
    return torch.cat(out), labels, S * (2 if w else 1), 100 * sec / n


@torch.no_grad()
def evaluate(a, model, device, dtype="float32", seed=0, batch=200):
    """The bound on the whole test split (EMA weights, one antithetic draw of t and eps per example),
    averaged: dict of test_bpd and its three terms. A conditional model is scored with the true labels."""
    x, y, _ = data.load(a["data"], "test", a["image_size"], a["data_dir"], a["classes"], a["seed"])
    torch.manual_seed(seed)
    sums = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(x), batch):
        k = to_int(a, data.to_float(x[i:i + batch]).to(device))
        yb = y[i:i + batch].to(device) if a["cond"] else None
        terms = elbo_terms(model, k, yb, a["T"], dtype=dtype)
        sums += torch.stack([v.double().sum().cpu() for v in terms])
    r, p, d = (sums / len(x)).tolist()
    return dict(test_bpd=r + p + d, test_recon=r, test_prior=p, test_diff=d)


def save_samples(a, x, path, real, per_row=None):
    """A PNG grid of images (one row per class when conditional, real row at the bottom) or a scatter."""
    if data.is_2d(a["data"]):
        data.save_scatter(x, path, a["data"], real=real)
    else:
        nrow = per_row or int(math.ceil(math.sqrt(len(x))))
        data.save_grid(x, path, nrow=nrow, real=real[:nrow] if real is not None else None)


def score(a, x):
    """Final scores: energy distance on 2-D data; data.score_images for images (where data.py has it)."""
    if data.is_2d(a["data"]):
        return data.score_2d(x, a["data"], seed=a["seed"])
    return data.score_images(x, a["data"]) if hasattr(data, "score_images") else {}


# ----------------------------------------------------------------------------------------------------
# Training in one flat step loop
ARCH = ("data", "image_size", "channels", "classes", "class_names", "T", "schedule", "gamma_min", "gamma_max",
        "fourier", "cond", "latent", "ch", "ch_mult", "num_res_blocks", "attn_res", "dropout", "temb_dim",
        "hidden", "layers")                                           # what a checkpoint fixes


def train(args, fail):
    ddp = "RANK" in os.environ                                   # launched by torchrun
    if ddp:
        backend = "nccl" if pick_device(args.device) == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        device = f"cuda:{os.environ['LOCAL_RANK']}" if backend == "nccl" else pick_device(args.device)
        if backend == "nccl":
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, pick_device(args.device)
    master = rank == 0
    torch.manual_seed(args.seed + rank)
    a = vars(args)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    ckpt = None
    if args.resume:
        try:
            ckpt = load_checkpoint(ckpt_path)
        except ValueError as e:
            fail(str(e))
        a.update({k: ckpt["args"][k] for k in ARCH})             # the architecture comes from the checkpoint
    elif os.path.exists(ckpt_path):
        fail(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")

    # data
    try:
        x, y, names = data.load(a["data"], "train", a["image_size"], a["data_dir"], a["classes"], a["seed"])
    except ValueError as e:
        fail(str(e))
    a["channels"] = 2 if data.is_2d(a["data"]) else x.shape[1]
    a["class_names"] = a.get("class_names") or names
    if a["cond"] and not a["class_names"]:
        fail(f"--cond needs labelled image data; {a['data']} has no classes")
    batches = data.batches(x, y, args.batch_size, flip=args.flip, seed=args.seed, device=device)
    real = data.load(a["data"], "test", seed=a["seed"])[0] if data.is_2d(a["data"]) else x[:10]

    # model, optimizer (AdamW as the paper; no weight decay on the schedule, it would pull gamma toward 0), EMA
    try:
        model = build_model(a).to(device)
        grid_labels(a, 1) if a["cond"] else None                 # reject a bad --labels before training
    except ValueError as e:
        fail(str(e))
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    sched_params = list(model.gamma.parameters())
    other = [p for n, p in model.named_parameters() if not n.startswith("gamma.")]
    opt = torch.optim.AdamW([dict(params=other), dict(params=sched_params, weight_decay=0.0)], lr=args.lr,
                            betas=(0.9, 0.99), weight_decay=args.weight_decay)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
    train_model = torch.compile(model) if args.compile else model
    if ddp:
        train_model = DDP(train_model, device_ids=[device] if backend == "nccl" else None)
    os.makedirs(args.out, exist_ok=True)

    def log(msg):
        if master:
            print(msg, flush=True)
            with open(os.path.join(args.out, "log.txt"), "a") as f:
                f.write(msg + "\n")

    def checkpoint():
        save_checkpoint(ckpt_path, dict(method="vdm", model=model.state_dict(), ema=ema.state_dict(),
                                        opt=opt.state_dict(), step=step, args=a))

    n_params = sum(p.numel() for p in model.parameters())
    log(f"vdm | data {a['data']} {tuple(x.shape)} | {n_params / 1e6:.2f}M params | device {device} x{world} "
        f"| {'T ' + str(a['T']) if a['T'] else 'continuous'} {a['schedule']}{' var-min' if args.var_min else ''}"
        f"{' latent' if a['latent'] else ''}{' cond' if a['cond'] else ''} | batch {args.batch_size} x{world} "
        f"| steps {step}..{args.steps}")
    t_log, t_start, step_start = time.time(), time.time(), step
    sums, n_sum, avg = torch.zeros(3, dtype=torch.float64), 0, [float("nan")] * 3
    while step < args.steps:
        # lr: linear warm-up, then constant (the paper) or cosine decay to 0
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        if args.lr_schedule == "cosine":
            lr *= 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x0, y0 = next(batches)
        k = to_int(a, x0)
        y = None
        if a["cond"]:                                            # label dropout to the null class (-1)
            y = torch.where(torch.rand(len(y0), device=device) < args.p_uncond, -1, y0)
        terms = train_model(k, y, T=a["T"], var_min=args.var_min, dtype=args.dtype)
        loss = sum(v.mean() for v in terms)                      # the negative ELBO in bits/dim
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        if not torch.isfinite(grad_norm):                        # identical on every rank (grads are all-reduced)
            log(f"non-finite loss/gradient at step {step} (loss {loss.item():.4g}): stopping; "
                f"the last good checkpoint is kept at {ckpt_path}")
            sys.exit(1)
        opt.step()
        step += 1
        # EMA with warm-up: decay (1 + n) / (10 + n) early on, so a short run already samples well from it
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        sums += torch.stack([v.detach().mean().double().cpu() for v in terms])
        n_sum += 1

        if time.time() - t_log > args.log_every or step == args.steps:
            avg, rate = (sums / n_sum).tolist(), (step - step_start) / (time.time() - t_start)
            eta = (args.steps - step) / max(rate, 1e-9)
            g0, g1 = (v.item() for v in model.gamma.endpoints())
            log(f"step {step:>7d}/{args.steps} | loss {sum(avg):.4f} bpd (recon {avg[0]:.4f} prior {avg[1]:.4f} "
                f"diff {avg[2]:.4f}) | gamma {g0:.2f}..{g1:.2f} | lr {lr:.2e} | {rate:.2f} steps/s "
                f"| eta {int(eta // 60)}m{int(eta % 60):02d}s")
            t_log, sums, n_sum = time.time(), torch.zeros(3, dtype=torch.float64), 0
        if master and args.sample_every and step % args.sample_every == 0 and step < args.steps:
            xs, _, _, _ = generate(a, ema, args.n_samples, device, args.dtype, args.seed)
            save_samples(a, xs, os.path.join(args.out, f"samples_{step:07d}.png"), real,
                         grid_labels(a, args.n_samples)[1] if a["cond"] else None)
        if master and (step % args.ckpt_every == 0 or step == args.steps):
            checkpoint()

    if master:
        test = evaluate(a, ema, device, args.dtype, args.seed)
        log(" | ".join(f"{k} {v:.4f}" for k, v in test.items()) + " (bits/dim, EMA weights, test split)")
        xs, _, nfe, sec100 = generate(a, ema, args.n_samples, device, args.dtype, args.seed)
        save_samples(a, xs, os.path.join(args.out, "samples.png"), real,
                     grid_labels(a, args.n_samples)[1] if a["cond"] else None)
        finish(a, xs, nfe, sec100, os.path.join(args.out, "metrics.json"), log,
               dict(step=step, loss=sum(avg), recon=avg[0], prior=avg[1], diff=avg[2], **test))
    if ddp:
        torch.distributed.destroy_process_group()


def finish(a, xs, nfe, sec100, path, log, extra):
    """Score the samples, print the final line and write metrics.json (the same keys in every method)."""
    scores = score(a, xs)
    S = a.get("sample_steps") or a["T"] or 1000
    sampler = f"ancestral{S}" + (f"_w{a['guidance']}" if a["cond"] else "")
    m = dict(method="vdm", data=a["data"], sampler=sampler, nfe=nfe, sec_per_100=round(sec100, 4),
             n_samples=len(xs), **extra, **scores)
    with open(path, "w") as f:
        json.dump(m, f, indent=1)
    shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items())
    log(f"done | {sampler} | NFE {nfe} per sample | {sec100:.2f} s per 100 samples" + (f" | {shown}" if shown else ""))


def from_checkpoint(args, fail):
    """The EMA model of a checkpoint, its args updated with this command's sampling flags, and its folder."""
    path = args.ckpt or os.path.join(args.out, "ckpt.pt")
    try:
        ckpt = load_checkpoint(path)
    except ValueError as e:
        fail(str(e))
    a = dict(ckpt["args"])
    a.update(sample_steps=args.sample_steps, guidance=args.guidance, labels=args.labels, seed=args.seed,
             data_dir=args.data_dir)
    if args.labels and not a["cond"]:
        fail("--labels needs a conditional checkpoint (trained with --cond)")
    device = pick_device(args.device)
    model = build_model(a).to(device)
    model.load_state_dict(ckpt["ema"])
    model.eval()
    out = os.path.dirname(path) if args.ckpt and args.out == DEFAULT_OUT else args.out
    os.makedirs(out, exist_ok=True)
    return a, model, device, out, ckpt["step"]


def sample_only(args, fail):
    """Generate from a checkpoint without the training flags (EMA weights)."""
    a, model, device, out, step = from_checkpoint(args, fail)
    n = args.n_samples or (2500 if data.is_2d(a["data"]) else 100)
    try:
        xs, labels, nfe, sec100 = generate(a, model, n, device, args.dtype, args.seed)
    except ValueError as e:
        fail(str(e))
    tag = f"ancestral{a['sample_steps'] or a['T'] or 1000}"
    real = data.load(a["data"], "test", seed=a["seed"])[0] if data.is_2d(a["data"]) else None
    save_samples(a, xs, os.path.join(out, f"samples_{tag}.png"), real, grid_labels(a, n)[1] if a["cond"] else None)
    if args.save_npz:                                            # uint8 NHWC (+ the labels), as improved-diffusion writes
        arr = xs if data.is_2d(a["data"]) else ((xs + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        extra = dict(arr_1=labels.numpy()) if labels is not None else {}
        tmp = os.path.join(out, f"samples_{tag}.tmp.npz")
        np.savez(tmp, arr_0=arr.numpy(), **extra)
        os.replace(tmp, os.path.join(out, f"samples_{tag}.npz"))
    finish(a, xs, nfe, sec100, os.path.join(out, f"metrics_{tag}.json"), print, dict(step=step))


def eval_only(args, fail):
    """--eval: the test-set bits/dim of a checkpoint's EMA weights, with each term; writes metrics_eval.json."""
    a, model, device, out, step = from_checkpoint(args, fail)
    test = evaluate(a, model, device, args.dtype, args.seed)
    print(" | ".join(f"{k} {v:.4f}" for k, v in test.items()) + f" (bits/dim, EMA weights at step {step})")
    with open(os.path.join(out, "metrics_eval.json"), "w") as f:
        json.dump(dict(method="vdm", data=a["data"], step=step, **test), f, indent=1)
    return test


# ----------------------------------------------------------------------------------------------------
# Command line
DEFAULT_OUT = "runs/vdm"
# Training budgets that fit a laptop CPU (flags override them). The model-level defaults (gamma -13.3 -> 5.0
# learned linear, continuous time, Fourier features 2^7, 2^8, AdamW betas (0.9, 0.99), weight decay 0.01,
# EMA 0.9999) are the paper's; its lr is 2e-4 with a 100-step warm-up and constant lr, batch 128, 10M steps,
# on a 32-block no-downsampling UNet (the README has that command).
DEFAULTS = {
    "image": dict(steps=3000, batch_size=64, lr=1e-3, warmup=100, lr_schedule="cosine", n_samples=100,
                  sample_every=0, fourier=[7, 8]),
    "2d": dict(steps=10000, batch_size=512, lr=1e-3, warmup=100, lr_schedule="cosine", n_samples=2500,
               sample_every=0, fourier=[]),
}


def get_parser():
    p = argparse.ArgumentParser(description="VDM (Kingma et al. 2021): bits/dim, learned schedules, guidance.",
                                allow_abbrev=False)
    # data
    p.add_argument("--data", default="glyphs", help="glyphs | cifar10 | mnist | swirl | path to an image folder")
    p.add_argument("--data-dir", default="./data", help="where cifar10/mnist are stored or downloaded")
    p.add_argument("--classes", nargs="+", default=None, help="keep these classes (names or indices)")
    p.add_argument("--image-size", type=int, default=16, help="images are resized to this size")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False, help="random horizontal flips")
    # diffusion
    p.add_argument("--T", type=int, default=0, help="0: continuous-time loss (Sec. 5); N: discrete loss on N steps")
    p.add_argument("--schedule", choices=["fixed", "scalar", "net"], default="scalar",
                   help="gamma(t): fixed linear, learned endpoints (paper default), or the monotone network")
    p.add_argument("--gamma-min", type=float, default=-13.3, help="gamma_0 (fixed, or the initial learned value)")
    p.add_argument("--gamma-max", type=float, default=5.0, help="gamma_1 (fixed, or the initial learned value)")
    p.add_argument("--var-min", action=argparse.BooleanOptionalAction, default=False,
                   help="train the net schedule's interior to minimise the loss variance (Sec. 5.3)")
    p.add_argument("--fourier", type=int, nargs="*", default=None,
                   help="input Fourier features sin/cos(2^n pi z) for these n (default 7 8 for images, none for "
                        "2-D and --latent); give no value for none")
    p.add_argument("--latent", action=argparse.BooleanOptionalAction, default=False,
                   help="variant: diffuse a learned conv encoder's latent, decode with a learned conv decoder")
    p.add_argument("--cond", action=argparse.BooleanOptionalAction, default=False,
                   help="class-conditional (labels shifted by one, null class for guidance)")
    p.add_argument("--p-uncond", type=float, default=0.2, help="with --cond: label dropout to the null class")
    p.add_argument("--guidance", type=float, default=1.0, help="with --cond: w in (1 + w) eps(c) - w eps(null)")
    p.add_argument("--labels", nargs="+", default=None, help="with --cond: classes the sample grid shows, one row each")
    p.add_argument("--sample-steps", type=int, default=None, help="ancestral steps (default T, or 1000 if continuous)")
    # model
    p.add_argument("--ch", type=int, default=32, help="UNet base channels (and the --latent coder width)")
    p.add_argument("--ch-mult", type=int, nargs="+", default=[1, 2, 2], help="UNet channel multiplier per level "
                   "(1 with many blocks: the paper's no-downsampling net)")
    p.add_argument("--num-res-blocks", type=int, default=1, help="residual blocks per UNet level")
    p.add_argument("--attn-res", type=int, nargs="*", default=[], help="resolutions with self-attention, e.g. 16")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout in the residual blocks")
    p.add_argument("--temb-dim", type=int, default=None, help="time-embedding width (default 4 * ch)")
    p.add_argument("--hidden", type=int, default=512, help="2-D MLP width")
    p.add_argument("--layers", type=int, default=3, help="2-D MLP hidden layers")
    # training
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 3000 images, 10000 2-D)")
    p.add_argument("--batch-size", type=int, default=None, help="batch per process (default: 64 images, 512 2-D)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3; the paper's 2e-4)")
    p.add_argument("--warmup", type=int, default=None, help="linear lr warm-up steps (the paper's 100)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default=None, help="after warm-up (the paper's constant)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on the schedule)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay of the sampling weights")
    # output and runtime
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for ckpt.pt, samples, log.txt, metrics.json")
    p.add_argument("--n-samples", type=int, default=None, help="samples per grid / final evaluation")
    p.add_argument("--sample-every", type=int, default=None, help="save a sample grid every this many steps (0: end only)")
    p.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every this many steps")
    p.add_argument("--log-every", type=float, default=5.0, help="seconds between log lines")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--sample-only", action="store_true", help="only sample from a checkpoint (OUT/ckpt.pt or --ckpt)")
    p.add_argument("--eval", action="store_true", help="only report the test-set bits/dim of a checkpoint")
    p.add_argument("--ckpt", default=None, help="checkpoint for --sample-only / --eval (default OUT/ckpt.pt)")
    p.add_argument("--save-npz", action="store_true", help="with --sample-only: also save the samples as uint8 .npz")
    p.add_argument("--seed", type=int, default=0, help="random seed (rank is added under DDP)")
    p.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto", help="where to run")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="autocast dtype of the network")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the network")
    return p


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.T < 0:
        parser.error("--T must be 0 (continuous time) or a number of steps >= 1")
    if args.sample_steps is not None and args.sample_steps < 1:
        parser.error("--sample-steps must be at least 1")
    if args.sample_only and args.eval:
        parser.error("--sample-only and --eval are separate modes: choose one")
    if args.sample_only:
        return sample_only(args, parser.error)
    if args.eval:
        return eval_only(args, parser.error)
    if not 0 <= args.p_uncond < 1:
        parser.error("--p-uncond must be in [0, 1)")
    if args.var_min and (args.schedule != "net" or args.T):
        parser.error("--var-min needs --schedule net and continuous time (--T 0): only there is the bound "
                     "independent of the schedule's interior")
    if data.is_2d(args.data) and args.data != "swirl":
        parser.error(f"vdm's 2-D mode needs 8-bit points: use --data swirl, not {args.data}")
    if args.latent and data.is_2d(args.data):
        parser.error("--latent needs image data (a conv encoder and decoder)")
    if args.labels and not args.cond:
        parser.error("--labels needs --cond")
    defaults = DEFAULTS["2d" if data.is_2d(args.data) else "image"]
    if args.latent:
        defaults = dict(defaults, fourier=[])                   # a learned latent has no 8-bit grid to resolve
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("steps", "batch_size", "n_samples", "ckpt_every"):
        if getattr(args, k) < 1:
            parser.error(f"--{k.replace('_', '-')} must be at least 1")
    train(args, parser.error)


if __name__ == "__main__":
    main()
