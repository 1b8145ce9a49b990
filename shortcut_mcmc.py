"""Shortcut MCMC: Gang Chen 2023, "Speed up the inference of diffusion models via shortcut MCMC sampling"
(arXiv 2301.01206).

Idea: a VDM-style diffusion model (continuous time, learnable linear gamma(t) = -log SNR(t)) is sampled through
a short chain of K times drawn from a grid of T: start at t = 1, and at each jump t -> s predict
x0_hat = (z_t - sigma_t eps_hat) / alpha_t and re-noise it, z_s = alpha_s x0_hat + sigma_s eps; the last x0_hat
is the sample (K + 1 network calls). Training adds a fidelity loss ||x0 - x0_hat||^2, back-propagated through
every network call of the chain (started from alpha_1 x0 + sigma_1 eps), to the usual VDM bound, so that the
K-step sampler lands on the data. --lambda-fid 0 is the plain VDM baseline. The paper's per-sample loss
(--fidelity l2) made every sampler worse in our runs; the default is a variant (--fidelity energy): the energy
distance between a batch of chain samples started from N(0, I), as at sampling, and a batch of data.

Run:   python shortcut_mcmc.py --compare               # swirl: baseline vs shortcut, K=10 and all 200 (~3 min)
       python shortcut_mcmc.py --fidelity l2 --lambda-fid 0.1 --out runs/shortcut_l2   # the paper's loss
       python shortcut_mcmc.py --data glyphs           # images with the shared UNet
       python shortcut_mcmc.py --sample-only --out runs/shortcut_mcmc/shortcut --K 10 --times even --save-npz

t convention: t is continuous in [0, 1] (gamma(0) least noise, gamma(1) most). The chain lives on the grid
t = n / T, n in {1..T}: it starts at n = T and visits K distinct n from {1..T-1}, drawn afresh every training
iteration, sorted descending. --K T-1 visits every grid time. The network sees gamma_t rescaled to [0, 1000].
Re-noising (--renoise): eps_hat is DDIM's eta = 0 step; forward reuses the chain start's noise (training: the eps
of z_1 = alpha_1 x0 + sigma_1 eps; sampling: z_1 itself); fresh draws new noise at every jump (z_s ~ q(z_s | x0_hat)).
"""
import argparse
import copy
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from unet import MLP, UNet

GAMMA_MIN, GAMMA_MAX = -13.3, 5.0                                # VDM's initial endpoints of gamma


# ----------------------------------------------------------------------------------------------------
# Schedule and model: gamma(t) = b + |w| t (VDM Sec. 3.2, learnable scalar endpoints), eps_hat(z_t; gamma_t)
def alpha_sigma(gamma):
    """alpha = sqrt(sigmoid(-gamma)), sigma = sqrt(sigmoid(gamma)): alpha^2 + sigma^2 = 1, SNR = exp(-gamma)."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


class ShortcutVDM(nn.Module):
    """The denoiser, the learnable linear schedule, and the data's box (for clipping x0_hat) and bin width (for
    the 8-bit likelihood) as buffers shaped like one example. forward() returns the training losses, so DDP
    wraps a single call however many network calls the chain makes."""

    def __init__(self, net, lo, hi, bin_width):
        super().__init__()
        self.net = net
        self.b = nn.Parameter(torch.tensor(GAMMA_MIN))
        self.w = nn.Parameter(torch.tensor(GAMMA_MAX - GAMMA_MIN))
        for name, v in (("lo", lo), ("hi", hi), ("bin_width", bin_width)):
            self.register_buffer(name, v)

    def gamma(self, t):
        return self.b + self.w.abs() * t

    def eps_hat(self, z, gamma_t, dtype="float32"):
        """eps_hat(z_t; gamma_t) with gamma_t (B,) rescaled to [0, 1000]; only the network runs under autocast."""
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            return self.net(z, 1000 * (gamma_t - GAMMA_MIN) / (GAMMA_MAX - GAMMA_MIN)).float()

    def forward(self, x0, cfg, use_fid):
        return losses(self, x0, cfg, use_fid)


# ----------------------------------------------------------------------------------------------------
# The chain (the paper's Sec. 3): K random grid times, x0_hat and re-noise at each jump
def chain_times(T, K, how="random", generator=None):
    """Grid indices n of the chain, t = n / T: T first (t = 1), then K distinct n from {1..T-1}, descending.
    random: a fresh uniform subset; even: DDIM's spacing of K + 1 calls over {1..T} (so it ends at n = 1)."""
    if not 1 <= K <= T - 1:
        raise ValueError(f"--K must be between 1 and T-1 = {T - 1}, got {K}")
    if how == "random":
        n = (torch.randperm(T - 1, generator=generator)[:K] + 1).tolist()
    else:
        n = [round(T - i * (T - 1) / K) for i in range(1, K + 1)]
    return [T] + sorted(n, reverse=True)


def run_chain(model, z, times, T, renoise, clip=True, eps_fwd=None, dtype="float32", generator=None):
    """From z at t = times[0] / T jump through `times`: x0_hat = (z_t - sigma_t eps_hat) / alpha_t, z_s = alpha_s x0_hat
    + sigma_s noise; returns the last x0_hat (len(times) network calls). The schedule is detached: a fidelity loss would
    lower gamma_1 and leak x0 into the training chain's start, which sampling from N(0, I) never has."""
    g = model.gamma(torch.tensor(times, device=z.device) / T).detach()
    alpha, sigma = alpha_sigma(g)
    eps_fwd = z if eps_fwd is None else eps_fwd                 # sampling: z_1 ~ N(0, I) is the forward noise
    for i in range(len(times)):
        eps_hat = model.eps_hat(z, g[i].expand(z.shape[0]), dtype)
        x0_hat = (z - sigma[i] * eps_hat) / alpha[i]
        x0_hat = x0_hat.clamp(model.lo, model.hi) if clip else x0_hat    # the data's box (METHODS pitfall)
        if i + 1 == len(times):
            return x0_hat
        if renoise == "eps_hat":                                 # DDIM eta = 0, eps consistent with the clipped x0_hat
            noise = (z - alpha[i] * x0_hat) / sigma[i]
        elif renoise == "forward":
            noise = eps_fwd
        else:
            noise = torch.randn(z.shape, generator=generator, device=z.device)
        z = alpha[i + 1] * x0_hat + sigma[i + 1] * noise


@torch.no_grad()
def sample_chain(model, shape, times, T, renoise, clip=True, generator=None, device="cpu", dtype="float32"):
    """The shortcut sampler: z_1 ~ N(0, I), then the chain over `times`; NFE = len(times)."""
    z = torch.randn(shape, generator=generator, device=device)
    return run_chain(model, z, times, T, renoise, clip, None, dtype, generator)


@torch.no_grad()
def sample_ancestral(model, shape, T, clip=True, generator=None, device="cpu", dtype="float32"):
    """VDM's ancestral sampler on the whole grid n = T..1 (Sec. 3.3): p(z_s | z_t) = q(z_s | z_t, x0_hat),
    mean (alpha_s / alpha_t)(1 - c) z_t + alpha_s c x0_hat, variance sigma_s^2 c, c = -expm1(gamma_s - gamma_t).
    Returns z_0 / alpha_0 (NFE = T)."""
    g = model.gamma(torch.arange(T + 1, device=device) / T).double()
    alpha, sigma = (v.float() for v in alpha_sigma(g))
    z = torch.randn(shape, generator=generator, device=device)
    for n in range(T, 0, -1):
        x0_hat = (z - sigma[n] * model.eps_hat(z, g[n].float().expand(shape[0]), dtype)) / alpha[n]
        x0_hat = x0_hat.clamp(model.lo, model.hi) if clip else x0_hat
        c = -torch.expm1(g[n - 1] - g[n]).float()
        z = alpha[n - 1] / alpha[n] * (1 - c) * z + alpha[n - 1] * c * x0_hat \
            + sigma[n - 1] * c.sqrt() * torch.randn(shape, generator=generator, device=device)
    return (z / alpha[0]).clamp(model.lo, model.hi) if clip else z / alpha[0]


# ----------------------------------------------------------------------------------------------------
# Losses: the VDM bound (continuous time) + lambda_fid * the fidelity loss through the chain
def energy_distance(x, y):
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| between two batches, flattened per example (the MMD variant)."""
    x, y = x.flatten(1), y.flatten(1)
    return 2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()


def losses(model, x0, cfg, use_fid):
    """Per-dimension (nats) terms (diff, prior, recon, fid) for a batch x0 (B, ...) in the data's units.
    diff:  VDM's continuous L_diff: 0.5 gamma'(t) ||eps - eps_hat(z_t; gamma_t)||^2, antithetic t, gamma' = |w|.
    prior: KL(q(z_1 | x) || N(0, I)) = 0.5 (sigma_1^2 + alpha_1^2 x^2 - log sigma_1^2 - 1).
    recon: -log p(x | z_0), a Gaussian of std exp(gamma_0 / 2) around z_0 / alpha_0 integrated over x's 8-bit bin.
    fid:   the paper's fidelity loss ||x0 - x0_hat||^2 of the K-step chain started at alpha_1 x0 + sigma_1 eps
           (--fidelity l2), or the variant: energy distance between chain outputs from N(0, I) and the batch."""
    B, view = x0.shape[0], (-1,) + (1,) * (x0.dim() - 1)
    g0, g1 = model.gamma(x0.new_zeros(())), model.gamma(x0.new_ones(()))
    t = (torch.rand(1, device=x0.device) + torch.arange(B, device=x0.device) / B) % 1
    gamma_t = model.gamma(t)
    alpha_t, sigma_t = alpha_sigma(gamma_t.view(view))
    eps = torch.randn_like(x0)
    diff = 0.5 * model.w.abs() * ((eps - model.eps_hat(alpha_t * x0 + sigma_t * eps, gamma_t, cfg["dtype"])) ** 2).mean()
    a2 = torch.sigmoid(-g1)
    prior = 0.5 * (a2 * x0 ** 2 - a2 + F.softplus(-g1)).mean()  # sigma_1^2 - 1 = -alpha_1^2, -log sigma_1^2 = softplus(-g1)
    h = (model.bin_width / (2 * torch.exp(0.5 * g0))).double()  # half a bin in units of the decoder's std
    e0 = torch.randn_like(x0).double()
    recon = -torch.log((torch.special.ndtr(h - e0) - torch.special.ndtr(-h - e0)).clamp(min=1e-12)).mean().float()
    fid = x0.new_zeros(())
    if use_fid:
        times = chain_times(cfg["T"], cfg["K"], "random")       # fresh times every iteration (the public code froze them)
        xb = x0[:cfg["fid_batch"]]
        if cfg["fidelity"] == "l2":
            a1, s1 = alpha_sigma(g1.detach())
            e1 = torch.randn_like(xb)
            x0_hat = run_chain(model, a1 * xb + s1 * e1, times, cfg["T"], cfg["renoise"], cfg["clip"], e1, cfg["dtype"])
            fid = ((xb - x0_hat) ** 2).mean()
        else:
            x0_hat = run_chain(model, torch.randn_like(xb), times, cfg["T"], cfg["renoise"], cfg["clip"], None, cfg["dtype"])
            fid = energy_distance(x0_hat, xb)
    return diff, prior, recon, fid


# ----------------------------------------------------------------------------------------------------
# Plumbing: device, model, checkpoint (the same shape in every method file)
def pick_device(name):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def build_model(a):
    """MLP for swirl, the shared UNet for images; box and bin width: swirl's per-axis range and 1 / std of its
    8-bit steps, images [-1, 1] and 2 / 255."""
    if data.is_2d(a["data"]):
        net = MLP(in_dim=2, hidden=a["hidden"], layers=a["layers"])
        lo, hi, bw = torch.tensor(a["box"][0]), torch.tensor(a["box"][1]), 1 / data.swirl_scale()[1]
    else:
        net = UNet(in_ch=a["channels"], ch=a["ch"], ch_mult=tuple(a["ch_mult"]), num_res_blocks=a["num_res_blocks"],
                   attn_res=tuple(a["attn_res"]), dropout=a["dropout"], temb_dim=a["temb_dim"],
                   image_size=a["image_size"])
        lo, hi, bw = torch.tensor(-1.0), torch.tensor(1.0), torch.tensor(2 / 255)
    return ShortcutVDM(net, lo.float(), hi.float(), bw.float())


def save_checkpoint(path, obj):
    """Write atomically: a crash mid-write never leaves a half-written ckpt.pt."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path):
    """Load a shortcut_mcmc checkpoint or raise ValueError with one clear line."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}") from None
    if not isinstance(ckpt, dict) or ckpt.get("method") != "shortcut_mcmc":
        found = ckpt.get("method") if isinstance(ckpt, dict) else None
        raise ValueError(f"{path} is not a shortcut_mcmc checkpoint (method: {found})")
    return ckpt


def sampler_name(a):
    """The sampler in words, e.g. chain10_random_eps_hat or ancestral200."""
    return f"ancestral{a['T']}" if a["times"] == "ancestral" else f"chain{a['K']}_{a['times']}_{a['renoise']}"


@torch.no_grad()
def generate(a, model, n, device, dtype="float32", seed=0, subset=0, how=None, K=None, batch=1024):
    """n samples from fixed noise (seed), in batches; random chain times come from (seed, subset).
    Returns (samples on cpu, NFE per sample, seconds per 100 samples)."""
    how, K, T = how or a["times"], K or a["K"], a["T"]
    shape = (2,) if data.is_2d(a["data"]) else (a["channels"], a["image_size"], a["image_size"])
    times = None if how == "ancestral" else chain_times(T, K, how, torch.Generator().manual_seed(1000 * seed + subset))
    b0 = min(batch, n)   # one untimed network call first: one-time set-up is not sampling time (every method)
    model.eps_hat(torch.zeros((b0,) + shape, device=device), torch.zeros(b0, device=device), dtype)
    g, t0, out = torch.Generator(device).manual_seed(seed), time.time(), []
    for b in [(min(batch, n - i),) + shape for i in range(0, n, batch)]:
        out.append((sample_ancestral(model, b, T, a["clip_x0"], g, device, dtype) if how == "ancestral" else
                    sample_chain(model, b, times, T, a["renoise"], a["clip_x0"], g, device, dtype)).cpu())
    return torch.cat(out), T if how == "ancestral" else len(times), 100 * (time.time() - t0) / n


def evaluate(a, model, device, dtype="float32", how=None, K=None, n=None):
    """Sample and score (energy distance for 2-D; legibility and class coverage under a classifier for labelled
    images) over --eval-seeds noise seeds (x --subsets random time subsets for a random chain).
    Returns (first samples, nfe, s per 100, scores with mean/std/min/max of the energy over all runs)."""
    how = how or a["times"]
    runs = [(s, j) for s in range(a["eval_seeds"]) for j in range(a["subsets"] if how == "random" else 1)]
    runs = runs if data.is_2d(a["data"]) else runs[:1]           # images: one run (the classifier is slow)
    first, all_scores = None, []
    for s, j in runs:
        xs, nfe, sec100 = generate(a, model, n or a["n_samples"], device, dtype, a["seed"] + s, j, how, K)
        first = (xs, nfe, sec100) if first is None else first
        all_scores.append(data.score_2d(xs, a["data"], seed=a["seed"]) if data.is_2d(a["data"]) else
                          data.score_images(xs, a["data"], a["image_size"], a["data_dir"], a["classes"]))
    scores = dict(all_scores[0])
    if "energy" in scores:
        e = torch.tensor([m["energy"] for m in all_scores], dtype=torch.float64)
        scores.update(energy=e.mean().item(), energy_std=e.std().item() if len(e) > 1 else 0.0,
                      energy_min=e.min().item(), energy_max=e.max().item(), runs=len(e))
    return (*first, scores)


def save_samples(a, x, path, real):
    """A PNG grid of images (real row at the bottom) or a scatter of 2-D points over the real data."""
    if data.is_2d(a["data"]):
        data.save_scatter(x, path, a["data"], real=real)
    else:
        data.save_grid(x, path, real=real[:int(math.sqrt(len(x)))] if real is not None else None)


# ----------------------------------------------------------------------------------------------------
# Training: the VDM bound + lambda_fid * fidelity, in one flat step loop
ARCH = ("data", "image_size", "channels", "classes", "box", "T", "ch", "ch_mult", "num_res_blocks", "attn_res",
        "dropout", "temb_dim", "hidden", "layers")   # what a checkpoint fixes


def train(args, fail, until=None):
    """Train to --steps (or stop at step `until`, checkpointed, for --compare's shared warm-up)."""
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
    torch.set_flush_denormal(True)                               # denormal floats make CPU steps ~10x slower
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
        x, y, _ = data.load(args.data, "train", args.image_size, args.data_dir, args.classes, args.seed)
    except ValueError as e:
        fail(str(e))
    a["channels"] = 2 if data.is_2d(args.data) else x.shape[1]
    if data.is_2d(args.data) and not a.get("box"):               # swirl's box: the training range, 5% margin
        lo, hi = x.min(0).values, x.max(0).values
        a["box"] = [(lo - 0.05 * (hi - lo)).tolist(), (hi + 0.05 * (hi - lo)).tolist()]
    batches = data.batches(x, y, args.batch_size, flip=args.flip, seed=args.seed, device=device)
    real = data.load(args.data, "test", seed=args.seed)[0] if data.is_2d(args.data) else x[:10]

    # model, optimizer (AdamW as VDM; no weight decay on the schedule), EMA
    try:
        model = build_model(a).to(device)
    except ValueError as e:
        fail(str(e))
    ema = copy.deepcopy(model).requires_grad_(False).eval()     # sampling weights; eval(): no dropout
    groups = [dict(params=list(model.net.parameters())), dict(params=[model.b, model.w], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
    train_model = torch.compile(model) if args.compile else model
    if ddp:
        train_model = DDP(train_model, device_ids=[device] if backend == "nccl" else None)
    cfg = dict(T=args.T, K=args.K, renoise=args.renoise, clip=args.clip_x0, fidelity=args.fidelity,
               fid_batch=args.fid_batch or args.batch_size, dtype=args.dtype)
    os.makedirs(args.out, exist_ok=True)

    def log(msg):
        if master:
            print(msg, flush=True)
            with open(os.path.join(args.out, "log.txt"), "a") as f:
                f.write(msg + "\n")

    def checkpoint():
        save_checkpoint(ckpt_path, dict(method="shortcut_mcmc", model=model.state_dict(), ema=ema.state_dict(),
                                        opt=opt.state_dict(), step=step, args=a))

    n_params = sum(p.numel() for p in model.parameters())
    log(f"shortcut_mcmc | data {args.data} {tuple(x.shape)} | {n_params / 1e6:.2f}M params | device {device} x{world} "
        f"| T {args.T} K {args.K} renoise {args.renoise} | lambda_fid {args.lambda_fid} ({args.fidelity}) from step "
        f"{args.fid_start} every {args.fid_every} | batch {args.batch_size} x{world} | steps {step}..{args.steps}")
    t_log, step_log, sums, n_sum, avg = time.time(), step, torch.zeros(4, dtype=torch.float64), 0, [float("nan")] * 4
    stop = args.steps if until is None else min(until, args.steps)
    while step < stop:
        # lr: linear warm-up, then constant or cosine decay to 0
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        if args.lr_schedule == "cosine":
            lr *= 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x0, _ = next(batches)
        use_fid = args.lambda_fid > 0 and step >= args.fid_start and (step - args.fid_start) % args.fid_every == 0
        terms = train_model(x0, cfg, use_fid)
        loss = terms[0] + terms[1] + terms[2] + args.lambda_fid * terms[3]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):  # NaN grads are all-reduced to every rank
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
        sums, n_sum = sums + torch.stack([v.detach().double().cpu() for v in terms]), n_sum + 1

        if time.time() - t_log > args.log_every or step == stop:
            avg, rate = (sums / n_sum).tolist(), (step - step_log) / (time.time() - t_log)
            eta = (stop - step) / max(rate, 1e-9)
            g0, g1 = model.b.item(), model.b.item() + model.w.abs().item()
            log(f"step {step:>7d}/{args.steps} | loss {sum(avg[:3]):.4f} nats/dim (diff {avg[0]:.4f} prior "
                f"{avg[1]:.4f} recon {avg[2]:.4f}) | fid {avg[3]:.4f} | gamma {g0:.2f}..{g1:.2f} | lr {lr:.2e} "
                f"| {rate:.2f} steps/s | eta {int(eta // 60)}m{int(eta % 60):02d}s")
            t_log, step_log, sums, n_sum = time.time(), step, torch.zeros(4, dtype=torch.float64), 0
        if master and args.sample_every and step % args.sample_every == 0 and step < args.steps:
            t_sample = time.time()
            xs, _, _ = generate(a, ema, args.n_samples, device, args.dtype, args.seed)
            save_samples(a, xs, os.path.join(args.out, f"samples_{step:07d}.png"), real)
            t_log += time.time() - t_sample                               # keep sampling out of steps/s
        if master and (step % args.ckpt_every == 0 or step == stop):
            checkpoint()

    if master and step < args.steps:                             # stopped early (--compare's warm-up)
        checkpoint()
    elif master:
        xs, nfe, sec100, scores = evaluate(a, ema, device, args.dtype)
        save_samples(a, xs, os.path.join(args.out, "samples.png"), real)
        finish(a, nfe, sec100, len(xs), scores, os.path.join(args.out, "metrics.json"), log,
               dict(step=step, loss=sum(avg[:3]), diff=avg[0], prior=avg[1], recon=avg[2], fid=avg[3]))
    if ddp:
        torch.distributed.destroy_process_group()
    return a, ema, real


def finish(a, nfe, sec100, n, scores, path, log, extra):
    """Print the final line and write metrics.json (the same keys in every method)."""
    sampler = sampler_name(a)
    m = dict(method="shortcut_mcmc", data=a["data"], sampler=sampler, nfe=nfe, sec_per_100=round(sec100, 4),
             n_samples=n, **extra, **scores)
    with open(path, "w") as f:
        json.dump(m, f, indent=1)
    shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items())
    log(f"done | {sampler} | NFE {nfe} per sample | {sec100:.2f} s per 100 samples" + (f" | {shown}" if shown else ""))


def sample_only(args, fail):
    """Generate from a checkpoint without the training flags (EMA weights)."""
    path = args.ckpt or os.path.join(args.out, "ckpt.pt")
    try:
        ckpt = load_checkpoint(path)
    except ValueError as e:
        fail(str(e))
    a = dict(ckpt["args"])
    if args.times != "ancestral" and not 1 <= args.K <= a["T"] - 1:
        fail(f"--K must be between 1 and the checkpoint's T-1 = {a['T'] - 1}")
    a.update(K=args.K, times=args.times, renoise=args.renoise or a["renoise"], subsets=args.subsets,
             eval_seeds=args.eval_seeds,
             clip_x0=a["clip_x0"] if args.clip_x0 is None else args.clip_x0, seed=args.seed)
    device = pick_device(args.device)
    torch.set_flush_denormal(True)
    model = build_model(a).to(device)
    model.load_state_dict(ckpt["ema"])
    model.eval()
    out = os.path.dirname(path) if args.ckpt and args.out == DEFAULT_OUT else args.out
    os.makedirs(out, exist_ok=True)
    n = args.n_samples or (1024 if data.is_2d(a["data"]) else 100)
    xs, nfe, sec100, scores = evaluate(a, model, device, args.dtype, n=n)
    tag = sampler_name(a)
    real = data.load(a["data"], "test", seed=a["seed"])[0] if data.is_2d(a["data"]) else None
    save_samples(a, xs, os.path.join(out, f"samples_{tag}.png"), real)
    if args.save_npz:                                            # uint8 NHWC, as improved-diffusion writes for FID tools
        arr = xs if data.is_2d(a["data"]) else ((xs + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        tmp = os.path.join(out, f"samples_{tag}.tmp.npz")
        np.savez(tmp, arr_0=arr.numpy())
        os.replace(tmp, os.path.join(out, f"samples_{tag}.npz"))
    finish(a, nfe, sec100, len(xs), scores, os.path.join(out, f"metrics_{tag}.json"), print, dict(step=ckpt["step"]))


def compare(args, fail):
    """The report's experiment: the baseline (lambda_fid 0) and the shortcut model share the diffusion-only warm-up
    (--fid-start steps, same seed), then each trains to --steps, with and without the fidelity loss; both are
    sampled with K random times (subsets x seeds), K evenly spaced ones, all T grid times and VDM's ancestral."""
    if "RANK" in os.environ:
        fail("--compare trains two models one after the other in one process: run it without torchrun")
    outs = {m: os.path.join(args.out, m) for m in ("baseline", "shortcut")}
    if any(os.path.exists(os.path.join(o, "ckpt.pt")) for o in outs.values()):
        fail(f"{args.out} holds a --compare run already: choose another --out")
    warm = argparse.Namespace(**dict(vars(args), lambda_fid=0.0, out=outs["baseline"]))
    train(warm, fail, until=args.fid_start)                      # the shared warm-up, checkpointed
    shutil.copytree(outs["baseline"], outs["shortcut"], dirs_exist_ok=True)
    K, T, two_d = args.K, args.T, data.is_2d(args.data)
    r0 = args.renoise                                            # rows: (label, times, K, renoise); K random with each
    rows = [(f"K={K} random, {r}", "random", K, r) for r in [r0] + [r for r in ("eps_hat", "forward", "fresh") if r != r0]]
    rows += [(f"K={K} even, {r0}", "even", K, r0), (f"all {T} grid times, {r0}", "even", T - 1, r0),
             (f"ancestral {T}", "ancestral", None, r0)]
    results, pics = {}, {}
    for name, lam in (("baseline", 0.0), ("shortcut", args.lambda_fid)):
        a, ema, real = train(argparse.Namespace(**dict(vars(args), lambda_fid=lam, out=outs[name], resume=True)), fail)
        for label, how, k, r in rows:
            xs, nfe, sec100, sc = evaluate(dict(a, renoise=r), ema, pick_device(args.device), args.dtype, how, k)
            results[f"{name} | {label}"], pics[name, label] = dict(nfe=nfe, sec_per_100=round(sec100, 4), **sc), xs
    head = "| model | sampler | NFE | energy (mean +- std) | min..max | floor |" if two_d else \
        "| model | sampler | NFE | legible % | classes covered |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, r in results.items():
        lines.append(f"| {key} | {r['nfe']} | " + (f"{r['energy']:.4f} +- {r['energy_std']:.4f} (n={r['runs']}) | "
                     f"{r['energy_min']:.4f}..{r['energy_max']:.4f} | {r['energy_floor']:.4f} |" if two_d else
                     f"{r.get('legible', float('nan')):.1f} | {r.get('classes_covered', '-')} |"))
    print(f"\nshortcut MCMC vs baseline | {args.data} | T {T} | {args.steps} steps each, fidelity from step "
          f"{args.fid_start} | renoise {args.renoise} | lambda_fid {args.lambda_fid} ({args.fidelity})\n" + "\n".join(lines))
    path = os.path.join(args.out, "compare.png")
    if two_d:
        data.save_scatter([pics[m, rows[i][0]] for i in (0, -2) for m in ("baseline", "shortcut")], path, args.data,
                          real=real, titles=[f"baseline K={K}", f"shortcut K={K}", f"baseline all {T}", f"shortcut all {T}"])
    else:
        b, c = pics["baseline", rows[0][0]], pics["shortcut", rows[0][0]]        # side by side, a blank column between
        r = int(math.sqrt(min(len(b), len(c))))
        grid = [b[:r * r].view(r, r, *b.shape[1:]), torch.ones(r, 1, *b.shape[1:]), c[:r * r].view(r, r, *b.shape[1:])]
        data.save_grid(torch.cat(grid, 1).flatten(0, 1), path, nrow=2 * r + 1)
    for name, text in (("compare.md", "\n".join(lines) + "\n"), ("compare.json", json.dumps(results, indent=1))):
        with open(os.path.join(args.out, name), "w") as f:
            f.write(text)
    print(f"picture: {path} (baseline | shortcut at K={K}" + (f"; then at all {T} grid times)" if two_d else ")"))
    return results


# ----------------------------------------------------------------------------------------------------
# Command line
DEFAULT_OUT = "runs/shortcut_mcmc"
# Training budgets that fit a laptop CPU (flags override them). The model-level defaults are the paper's:
# T = 200, K = 10, VDM's learnable linear gamma from -13.3 to 5.0, AdamW betas (0.9, 0.99), weight decay 0.01.
DEFAULTS = {
    "image": dict(steps=3000, batch_size=64, lr=1e-3, warmup=100, lr_schedule="cosine", n_samples=100,
                  sample_every=1500, fid_start=1500, fid_batch=16, clip_x0=True, renoise="eps_hat"),
    "2d": dict(steps=4000, batch_size=512, lr=1e-3, warmup=100, lr_schedule="cosine", n_samples=1024,
               sample_every=0, fid_start=3000, fid_batch=128, clip_x0=True, renoise="eps_hat"),
}


def get_parser():
    p = argparse.ArgumentParser(description="Shortcut MCMC (Chen 2023): VDM sampled in K steps.", allow_abbrev=False)
    # data
    p.add_argument("--data", default="swirl", help="swirl | glyphs | cifar10 | mnist | path to an image folder")
    p.add_argument("--data-dir", default="./data", help="where cifar10/mnist are stored or downloaded")
    p.add_argument("--classes", nargs="+", default=None, help="keep these classes (names or indices)")
    p.add_argument("--image-size", type=int, default=16, help="images are resized to this size")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False, help="random horizontal flips")
    # diffusion and the chain
    p.add_argument("--T", type=int, default=200, help="grid of chain times t = n / T")
    p.add_argument("--K", type=int, default=10, help="chain steps after t = 1 (K + 1 network calls), 1..T-1")
    p.add_argument("--renoise", choices=["forward", "eps_hat", "fresh"], default=None, help="re-noise x0_hat with the "
                   "chain start's noise, DDIM's eps_hat, or new noise (default eps_hat; the checkpoint's when sampling)")
    p.add_argument("--times", choices=["random", "even", "ancestral"], default="random", help="K random or even times, or all T")
    p.add_argument("--subsets", type=int, default=5, help="random time subsets scored per noise seed")
    p.add_argument("--eval-seeds", type=int, default=3, help="noise seeds scored in the final evaluation")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None, help="clip x0_hat to the data's box")
    p.add_argument("--lambda-fid", type=float, default=1.0, help="weight of the fidelity loss (0: the VDM baseline)")
    p.add_argument("--fidelity", choices=["l2", "energy"], default="energy", help="l2: the paper's ||x0 - x0_hat||^2 "
                   "from alpha_1 x0 + sigma_1 eps; energy (variant): energy distance of chain samples to the batch")
    p.add_argument("--fid-start", type=int, default=None, help="diffusion-loss-only warm-up steps before the fidelity loss")
    p.add_argument("--fid-every", type=int, default=1, help="add the fidelity loss every this many steps")
    p.add_argument("--fid-batch", type=int, default=None, help="examples run through the chain (default: 128 2-D, 16 images)")
    p.add_argument("--compare", action="store_true", help="train the baseline and the shortcut model, print the table")
    # model
    p.add_argument("--ch", type=int, default=32, help="UNet base channels")
    p.add_argument("--ch-mult", type=int, nargs="+", default=[1, 2, 2], help="UNet channel multiplier per level")
    p.add_argument("--num-res-blocks", type=int, default=1, help="residual blocks per UNet level")
    p.add_argument("--attn-res", type=int, nargs="*", default=[], help="resolutions with self-attention, e.g. 16")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout in the residual blocks")
    p.add_argument("--temb-dim", type=int, default=None, help="time-embedding width (default 4 * ch)")
    p.add_argument("--hidden", type=int, default=512, help="2-D MLP width")
    p.add_argument("--layers", type=int, default=3, help="2-D MLP hidden layers")
    # training
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 3000 images, 4000 2-D)")
    p.add_argument("--batch-size", type=int, default=None, help="batch per process (default: 64 images, 512 2-D)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=None, help="linear lr warm-up steps")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default=None, help="after warm-up")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the sampling weights")
    # output and runtime
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for ckpt.pt, samples, log.txt, metrics.json")
    p.add_argument("--n-samples", type=int, default=None, help="samples per picture / evaluation run")
    p.add_argument("--sample-every", type=int, default=None, help="save samples every this many steps (0: end only)")
    p.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every this many steps")
    p.add_argument("--log-every", type=float, default=5.0, help="seconds between log lines")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--sample-only", action="store_true", help="only sample from a checkpoint (OUT/ckpt.pt or --ckpt)")
    p.add_argument("--ckpt", default=None, help="checkpoint for --sample-only (default OUT/ckpt.pt)")
    p.add_argument("--save-npz", action="store_true", help="with --sample-only: also save the samples as .npz")
    p.add_argument("--seed", type=int, default=0, help="random seed (rank is added under DDP)")
    p.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto", help="where to run")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="autocast dtype of the network")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the network")
    return p


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    checks = [(args.T < 2, "--T must be at least 2"),
              (not args.sample_only and not 1 <= args.K <= args.T - 1, f"--K must be between 1 and T-1 = {args.T - 1}"),
              (args.lambda_fid < 0, "--lambda-fid must be >= 0"),
              (args.fid_every < 1, "--fid-every must be at least 1"),
              ((args.fid_start or 0) < 0, "--fid-start must be >= 0"),
              (min(args.subsets, args.eval_seeds) < 1, "--subsets and --eval-seeds must be at least 1"),
              (args.compare and (args.sample_only or args.resume), "--compare trains from scratch: drop --sample-only/--resume"),
              (data.is_2d(args.data) and args.data != "swirl", f"shortcut_mcmc's 2-D mode needs the 8-bit swirl "
               f"(its likelihood term needs the bin width): use --data swirl, not {args.data}")]
    for msg in [msg for bad, msg in checks if bad][:1]:
        parser.error(msg)
    if args.sample_only:
        return sample_only(args, parser.error)
    args.box = None
    for k, v in DEFAULTS["2d" if data.is_2d(args.data) else "image"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("steps", "batch_size", "n_samples", "ckpt_every", "fid_batch"):
        if getattr(args, k) < 1:
            parser.error(f"--{k.replace('_', '-')} must be at least 1")
    return compare(args, parser.error) if args.compare else train(args, parser.error)


if __name__ == "__main__":
    main()
