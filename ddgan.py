"""DDGAN: Denoising Diffusion GANs (Xiao, Kreis & Vahdat 2022, "Tackling the generative learning trilemma with
denoising diffusion GANs", arXiv 2112.07804).

Idea: a diffusion model with only T = 1..8 steps. Its steps are so large that the true denoising
distribution q(x_{t-1} | x_t) is multimodal, so it is not modelled by a Gaussian but by a conditional GAN.
The generator G(x_t, t, z) predicts a clean x0_hat; the fake x_{t-1} is drawn from the Gaussian posterior
q(x_{t-1} | x_t, x0_hat) (Eq. 7 of DDPM, Sec. 4.3 here), so the latent z makes p(x_{t-1} | x_t) multimodal.
A time-dependent discriminator D(x_{t-1}, x_t, t) tells real pairs from the forward process (Eq. 4) apart
from fake pairs; the adversarial loss (Eqs. 5-6) uses softplus on logits, the non-saturating G loss and a
lazy R1 penalty on the real x_{t-1}. Sampling costs T network calls (NFE = T).

Run:   python ddgan.py                                  # glyphs 16x16, T=4, CPU-sized nets, ~10 min on 2 cores
       python ddgan.py --data 25gaussians               # 2-D mixture, 3-layer 256-wide MLPs for G and D, ~9 min
       python ddgan.py --no-z                           # the paper's ablation: a unimodal (z-free) denoiser
       python ddgan.py --sample-only --out runs/ddgan --save-npz

t convention: t runs over {1..T}; beta[t - 1] is beta_t and alpha_bar[t - 1] is alpha_bar_t. The betas come
from the continuous VP curve alpha_bar(s) on the grid s_k = (k/T)(1 - 1e-3) + 1e-3, k = 0..T. That curve is
0.9999 (not 1) at s_0, so "x_0" needs a convention: like the official code, x_0 is the data itself and
alpha_bar_t = prod_{k <= t} (1 - beta_k) = alpha_bar(s_t) / alpha_bar(s_0), with alpha_bar_0 = 1. Then
q(x_t | x_0) is exactly the product of the T transitions, and the 1e-3 offset only shapes beta_1.
The real pair at step t is (x_{t-1}, x_t): x_{t-1} ~ q(x_{t-1} | x_0) (the data itself when t = 1), then
x_t ~ q(x_t | x_{t-1}). The networks see t rescaled to 1000 t / T, as in ddpm.py.
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
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from unet import MLP, Discriminator, UNet


# ----------------------------------------------------------------------------------------------------
# Schedule
def make_schedule(T, beta_min=0.1, beta_max=20.0, eps_small=1e-3):
    """Return a dict of float32 tensors of length T (index t - 1 holds the value for step t).

    The VP SDE's alpha_bar(s) = exp(-0.5 s^2 (b_max - b_min) - s b_min) on s_k = (k/T)(1 - eps) + eps,
    beta_k = 1 - alpha_bar(s_k) / alpha_bar(s_{k-1}) (Sec. 5 / App. C). For T = 4: 0.478, 0.849, 0.956, 0.987;
    alpha_bar_T ~ 4e-5 for every T. (DDPM's linear 1e-4..0.02 at T = 4 would leave alpha_bar_T = 0.96.)
    """
    s = torch.arange(T + 1, dtype=torch.float64) / T * (1 - eps_small) + eps_small    # s_0 = 1e-3 .. s_T = 1
    log_ab = -0.5 * s ** 2 * (beta_max - beta_min) - s * beta_min
    beta = -torch.expm1(log_ab[1:] - log_ab[:-1])                       # 1 - ab(s_k) / ab(s_{k-1})
    alpha = 1 - beta
    alpha_bar = torch.cumprod(alpha, 0)                                 # = ab(s_t) / ab(s_0): x_0 is the data
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    # Posterior q(x_{t-1} | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, beta_tilde I), DDPM Eqs. 6-7.
    beta_tilde = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)          # 0 at t = 1: the last step is x0 itself
    coef_x0 = beta * alpha_bar_prev.sqrt() / (1 - alpha_bar)
    coef_xt = (1 - alpha_bar_prev) * alpha.sqrt() / (1 - alpha_bar)
    sched = dict(beta=beta, alpha=alpha, alpha_bar=alpha_bar, alpha_bar_prev=alpha_bar_prev,
                 beta_tilde=beta_tilde, coef_x0=coef_x0, coef_xt=coef_xt)
    return {k: v.float() for k, v in sched.items()}


def at(v, t, x):
    """Gather schedule values for integer steps t in {1..T} (B,), shaped to broadcast against x."""
    return v.to(x.device)[t - 1].view(-1, *([1] * (x.dim() - 1)))


# ----------------------------------------------------------------------------------------------------
# Forward process: real pairs, and the posterior that turns G's x0_hat into a fake x_{t-1}
def q_sample_pairs(sched, x0, t):
    """Real pair (x_{t-1}, x_t): x_{t-1} ~ q(x_{t-1} | x_0) (Eq. 4 of DDPM, alpha_bar_0 = 1 so x_0 at t = 1),
    then x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (Eq. 1 here)."""
    ab_prev = at(sched["alpha_bar_prev"], t, x0)
    x_prev = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * torch.randn_like(x0)
    beta = at(sched["beta"], t, x0)
    x_t = (1 - beta).sqrt() * x_prev + beta.sqrt() * torch.randn_like(x0)
    return x_prev, x_t


def sample_posterior(sched, x0, x_t, t, generator=None):
    """x_{t-1} ~ q(x_{t-1} | x_t, x0) (DDPM Eqs. 6-7); the variance is 0 at t = 1, so the sample is x0 there."""
    mean = at(sched["coef_x0"], t, x_t) * x0 + at(sched["coef_xt"], t, x_t) * x_t
    noise = torch.randn(x_t.shape, generator=generator, device=x_t.device)
    return mean + at(sched["beta_tilde"], t, x_t).sqrt() * noise


# ----------------------------------------------------------------------------------------------------
# Adversarial losses (Eqs. 5-6), on logits only: softplus(-l) = -log sigmoid(l), softplus(l) = -log(1 - sigmoid(l)),
# finite for any logit (the report's sigmoid-then-log turned into -inf at |logit| ~ 17 and gave black images)
def d_loss(real_logits, fake_logits):
    """D: -log D(real) - log(1 - D(fake)) = softplus(-l_real) + softplus(l_fake), batch means."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss(fake_logits):
    """G, non-saturating (Eq. 6 as implemented): -log D(fake) = softplus(-l_fake)."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits, x_prev):
    """R1 (Mescheder et al. 2018): E ||grad_{x_{t-1}} D(x_{t-1}, x_t, t)||^2 on real pairs, differentiable in D's
    parameters (create_graph). The caller scales it by gamma / 2."""
    (grad,) = torch.autograd.grad(real_logits.sum(), x_prev, create_graph=True)
    return grad.pow(2).reshape(len(grad), -1).sum(1).mean()


# ----------------------------------------------------------------------------------------------------
# Sampler (Alg. 1 of the paper's App. / Sec. 4): x_T ~ N(0, I); for t = T..1: x0_hat = G(x_t, t, z) with a fresh z,
# x_{t-1} ~ q(x_{t-1} | x_t, x0_hat); no noise at t = 1, so the output is G's last x0_hat. NFE = T.
@torch.no_grad()
def sample(gen, sched, shape, nz, generator=None, device="cpu"):
    """`gen(x_t, t, z)` returns x0_hat for integer t in {1..T}; nz = 0 means no latent (the --no-z ablation)."""
    T = len(sched["beta"])
    x = torch.randn(shape, generator=generator, device=device)
    for step in range(T, 0, -1):
        t = torch.full((shape[0],), step, device=device, dtype=torch.long)
        z = torch.randn(shape[0], nz, generator=generator, device=device) if nz else None
        x = sample_posterior(sched, gen(x, t, z), x, t, generator)
    return x


# ----------------------------------------------------------------------------------------------------
# Plumbing: device, models, checkpoint (the same shape in every method file)
def pick_device(name):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


POINT_GAIN = 4.0


def build_models(a, in_ch):
    """G (x0 predictor with latent z) and D(cat(x_{t-1}, x_t), t): the shared UNet / Discriminator for images,
    MLPs for 2-D points (x0 predicted directly there: tanh cannot reach data at +-4)."""
    nz = 0 if a["no_z"] else a["nz"]
    if data.is_2d(a["data"]):
        # points enter both nets x POINT_GAIN (G's output is divided by it): with the natural scale (modes of std
        # 0.05 on a +-4 grid) the MLPs did not resolve the modes; D uses LeakyReLU(0.2) like the image D
        G = MLP(in_dim=2, hidden=a["hidden"], layers=a["layers"], z_dim=nz, in_scale=POINT_GAIN,
                out_scale=1 / POINT_GAIN)
        D = MLP(in_dim=4, out_dim=1, hidden=a["hidden"], layers=a["layers"], zero_out=False, act="lrelu",
                in_scale=POINT_GAIN)
        return G, D
    G = UNet(in_ch=in_ch, ch=a["ch"], ch_mult=tuple(a["ch_mult"]), num_res_blocks=a["num_res_blocks"],
             attn_res=tuple(a["attn_res"]), dropout=a["dropout"], temb_dim=a["temb_dim"],
             image_size=a["image_size"], z_dim=nz, out_act="tanh", zero_init=False)
    D = Discriminator(in_ch=2 * in_ch, ch=a["d_ch"] or a["ch"], ch_mult=tuple(a["ch_mult"]), num_res_blocks=1,
                      image_size=a["image_size"])
    return G, D


def gen_fn(G, T, dtype):
    """Wrap G as x0_hat = gen(x_t, t, z) with t in {1..T} rescaled to 1000 t / T; only the network runs under
    autocast, the schedule math stays in float32."""
    def gen(x_t, t, z):
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            return G(x_t, t.float() * (1000.0 / T), z=z).float()
    return gen


def disc_fn(D, T, dtype):
    """Wrap D as logits = disc(x_{t-1}, x_t, t) (B,): the two inputs concatenated on channels (dim 1)."""
    def disc(x_prev, x_t, t):
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            return D(torch.cat([x_prev, x_t], 1), t.float() * (1000.0 / T)).float().reshape(-1)  # MLP: (B, 1) -> (B,)
    return disc


def save_checkpoint(path, obj):
    """Write atomically: a crash mid-write never leaves a half-written ckpt.pt."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path):
    """Load a ddgan checkpoint or raise ValueError with one clear line."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("method") != "ddgan":
        raise ValueError(f"{path} is a {ckpt.get('method')!r} checkpoint, not a ddgan one")
    return ckpt


@torch.no_grad()
def generate(a, G, n, device, dtype="float32", seed=0, batch=500):
    """Sample n items from fixed noise (seed). Returns (samples on cpu, NFE per sample, seconds per 100 samples)."""
    sched, T = make_schedule(a["T"], a["beta_min"], a["beta_max"]), a["T"]
    gen = gen_fn(G, T, dtype)
    g = torch.Generator(device).manual_seed(seed)
    shape = (2,) if data.is_2d(a["data"]) else (a["channels"], a["image_size"], a["image_size"])
    was_training = G.training
    G.eval()
    b0 = min(batch, n)   # one untimed network call: one-time set-up is not sampling time (the same in every method)
    gen(torch.zeros((b0,) + shape, device=device), torch.ones(b0, dtype=torch.long, device=device),
        torch.zeros(b0, a["nz"], device=device) if not a["no_z"] else None)
    t0, out = time.time(), []
    for i in range(0, n, batch):
        b = (min(batch, n - i),) + shape
        out.append(sample(gen, sched, b, 0 if a["no_z"] else a["nz"], generator=g, device=device).cpu())
    sec = time.time() - t0
    G.train(was_training)
    return torch.cat(out), T, 100 * sec / n


def save_samples(a, x, path, real):
    """A PNG grid of images (real row at the bottom) or a scatter of 2-D points over the real data."""
    if data.is_2d(a["data"]):
        data.save_scatter(x, path, a["data"], real=real)
    else:
        data.save_grid(x, path, real=real[:int(math.sqrt(len(x)))] if real is not None else None)


def score(a, x):
    """Final scores: energy distance (+ modes for 25gaussians) on 2-D data; legibility and class coverage
    under a classifier trained on the real images for labelled image data."""
    if data.is_2d(a["data"]):
        return data.score_2d(x, a["data"], seed=a["seed"])
    return data.score_images(x, a["data"], a["image_size"], a["data_dir"], a["classes"])


# ----------------------------------------------------------------------------------------------------
# Training: one D step then one G step per iteration, in one flat step loop
ARCH = ("data", "image_size", "channels", "classes", "T", "beta_min", "beta_max", "nz", "no_z", "ch", "ch_mult",
        "num_res_blocks", "attn_res", "dropout", "temb_dim", "d_ch", "hidden", "layers")   # what a checkpoint fixes


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
    torch.set_flush_denormal(True)                               # denormal floats make CPU steps ~10x slower
    a = vars(args)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(ckpt_path)
        a.update({k: ckpt["args"][k] for k in ARCH})             # the architecture comes from the checkpoint
    elif os.path.exists(ckpt_path):
        fail(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")

    # data
    try:
        x, y, _ = data.load(args.data, "train", args.image_size, args.data_dir, args.classes, args.seed)
    except ValueError as e:
        fail(str(e))
    a["channels"] = 2 if data.is_2d(args.data) else x.shape[1]
    batches = data.batches(x, y, args.batch_size, flip=args.flip, seed=args.seed, device=device)
    # real data drawn beside the samples: held-out points under a scatter, or a row of training images
    real = data.load(args.data, "test", seed=args.seed)[0] if data.is_2d(args.data) else x[:10]

    # models, optimizers (Adam betas (0.5, 0.9) for both), EMA of G
    try:
        G, D = (m.to(device) for m in build_models(a, a["channels"]))
    except ValueError as e:
        fail(str(e))
    ema = copy.deepcopy(G).requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(0.5, 0.9))
    step = 0
    if ckpt is not None:
        G.load_state_dict(ckpt["G"])
        D.load_state_dict(ckpt["D"])
        ema.load_state_dict(ckpt["ema"])
        opt_g.load_state_dict(ckpt["opt_G"])
        opt_d.load_state_dict(ckpt["opt_D"])
        step = ckpt["step"]
    # D is never compiled: the R1 penalty needs a double backward, which torch.compile does not support
    train_G = torch.compile(G) if args.compile else G
    train_D = D
    if ddp:
        train_G = DDP(train_G, device_ids=[device] if backend == "nccl" else None)
        train_D = DDP(train_D, device_ids=[device] if backend == "nccl" else None)
    sched = make_schedule(args.T, args.beta_min, args.beta_max)
    nz = 0 if args.no_z else args.nz
    # The D step updates D through its DDP wrapper and runs G unwrapped without gradients; the G step updates G
    # through its wrapper and runs D unwrapped (frozen), so each wrapper all-reduces only what is being trained.
    gen, gen_nograd = gen_fn(train_G, args.T, args.dtype), gen_fn(G, args.T, args.dtype)
    disc, disc_frozen = disc_fn(train_D, args.T, args.dtype), disc_fn(D, args.T, args.dtype)
    os.makedirs(args.out, exist_ok=True)

    def log(msg):
        if master:
            print(msg, flush=True)
            with open(os.path.join(args.out, "log.txt"), "a") as f:
                f.write(msg + "\n")

    def checkpoint():
        save_checkpoint(ckpt_path, dict(method="ddgan", G=G.state_dict(), D=D.state_dict(), ema=ema.state_dict(),
                                        opt_G=opt_g.state_dict(), opt_D=opt_d.state_dict(), step=step, args=a))

    def stop(what, value):
        log(f"non-finite {what} at step {step} ({value:.4g}): stopping; the last good checkpoint is kept at "
            f"{ckpt_path}")
        sys.exit(1)

    n_g, n_d = (sum(p.numel() for p in m.parameters()) for m in (G, D))
    log(f"ddgan | data {args.data} {tuple(x.shape)} | G {n_g / 1e6:.2f}M D {n_d / 1e6:.2f}M params | device {device} "
        f"x{world} | T {args.T} | nz {nz} | batch {args.batch_size} x{world} | steps {step}..{args.steps}")
    clip = args.grad_clip if args.grad_clip > 0 else float("inf")   # inf: measure the norm only
    t_log, t_start, step_start = time.time(), time.time(), step
    sums, n_sum, avg = dict(d=0.0, g=0.0, real=0.0, fake=0.0, r1=0.0), 0, dict(d=float("nan"), g=float("nan"))
    while step < args.steps:
        # lr: optional linear warm-up, then constant or cosine decay to lr_min (the paper: cosine to 1e-5)
        scale = min(1.0, (step + 1) / max(1, args.warmup))
        cos = 0.5 * (1 + math.cos(math.pi * step / args.steps)) if args.lr_schedule == "cosine" else 1.0
        lr_g, lr_d = (scale * (min(args.lr_min, lr) + (lr - min(args.lr_min, lr)) * cos) for lr in (args.lr_g, args.lr_d))
        for opt, lr in ((opt_g, lr_g), (opt_d, lr_d)):
            for group in opt.param_groups:
                group["lr"] = lr
        x0, _ = next(batches)
        B = x0.shape[0]

        # D step: real pair vs fake pair at a random t; R1 (gamma / 2) ||grad||^2 on every --lazy-reg-th step.
        # As in the official code it is not multiplied by the interval (StyleGAN2 does), so the paper's gamma
        # values (0.02 on CIFAR-10 with --lazy-reg 15) mean the same here
        t = torch.randint(1, args.T + 1, (B,), device=device)
        x_prev, x_t = q_sample_pairs(sched, x0, t)
        reg = args.r1_gamma > 0 and args.lazy_reg > 0 and step % args.lazy_reg == 0
        x_prev.requires_grad_(reg)
        real_logits = disc(x_prev, x_t, t)
        with torch.no_grad():
            z = torch.randn(B, nz, device=device) if nz else None
            fake_prev = sample_posterior(sched, gen_nograd(x_t, t, z), x_t, t)
        fake_logits = disc(fake_prev, x_t, t)
        loss_d = d_loss(real_logits, fake_logits)
        r1 = r1_penalty(real_logits, x_prev) if reg else torch.zeros((), device=device)
        opt_d.zero_grad(set_to_none=True)
        (loss_d + args.r1_gamma / 2 * r1 if reg else loss_d).backward()
        norm_d = torch.nn.utils.clip_grad_norm_(D.parameters(), clip)
        if not (torch.isfinite(loss_d) and torch.isfinite(norm_d)):   # identical on every rank (all-reduced)
            stop("D loss/gradient", loss_d.item() if not torch.isfinite(loss_d) else norm_d.item())
        opt_d.step()

        # G step: fresh t, pair and z; the non-saturating loss through the frozen D
        t = torch.randint(1, args.T + 1, (B,), device=device)
        _, x_t = q_sample_pairs(sched, x0, t)
        z = torch.randn(B, nz, device=device) if nz else None
        D.requires_grad_(False)
        loss_g = g_loss(disc_frozen(sample_posterior(sched, gen(x_t, t, z), x_t, t), x_t, t))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        D.requires_grad_(True)
        norm_g = torch.nn.utils.clip_grad_norm_(G.parameters(), clip)
        if not (torch.isfinite(loss_g) and torch.isfinite(norm_g)):
            stop("G loss/gradient", loss_g.item() if not torch.isfinite(loss_g) else norm_g.item())
        opt_g.step()
        step += 1
        # EMA with warm-up: decay (1 + n) / (10 + n) early on, so a short run already samples well from it
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), G.parameters()):
                p_ema.lerp_(p, 1 - decay)
            for p_ema, p in zip(ema.buffers(), G.buffers()):
                p_ema.copy_(p)
        for k, v in dict(d=loss_d, g=loss_g, real=real_logits.mean(), fake=fake_logits.mean()).items():
            sums[k] += v.item()
        sums["r1"], n_sum = max(sums["r1"], r1.item()), n_sum + 1

        if time.time() - t_log > args.log_every or step == args.steps:
            avg, rate = {k: v / n_sum for k, v in sums.items()}, (step - step_start) / (time.time() - t_start)
            eta = (args.steps - step) / max(rate, 1e-9)
            log(f"step {step:>7d}/{args.steps} | loss D {avg['d']:.4f} G {avg['g']:.4f} | D(real) {avg['real']:+.2f} "
                f"D(fake) {avg['fake']:+.2f} | r1 {sums['r1']:.3g} | lr {lr_g:.2e}/{lr_d:.2e} | {rate:.2f} steps/s "
                f"| eta {int(eta // 60)}m{int(eta % 60):02d}s")
            t_log, sums, n_sum = time.time(), dict.fromkeys(sums, 0.0), 0
        if master and args.sample_every and step % args.sample_every == 0 and step < args.steps:
            xs, _, _ = generate(a, ema, args.n_samples, device, args.dtype, args.seed)
            save_samples(a, xs, os.path.join(args.out, f"samples_{step:07d}.png"), real)
            log(f"samples at step {step}: " + " | ".join(f"{k} {v:.4g}" for k, v in score(a, xs).items()))
        if master and (step % args.ckpt_every == 0 or step == args.steps):
            checkpoint()

    if master:
        xs, nfe, sec100 = generate(a, ema, args.n_samples, device, args.dtype, args.seed)
        save_samples(a, xs, os.path.join(args.out, "samples.png"), real)
        finish(a, xs, nfe, sec100, os.path.join(args.out, "metrics.json"), log,
               dict(step=step, loss_d=avg["d"], loss_g=avg["g"]))
    if ddp:
        torch.distributed.destroy_process_group()


def finish(a, xs, nfe, sec100, path, log, extra):
    """Score the samples, print the final line and write metrics.json (the same keys in every method)."""
    scores = score(a, xs)
    sampler = f"ddgan_T{a['T']}" + ("_noz" if a["no_z"] else "")
    m = dict(method="ddgan", data=a["data"], sampler=sampler, nfe=nfe, sec_per_100=round(sec100, 4),
             n_samples=len(xs), **extra, **scores)
    with open(path, "w") as f:
        json.dump(m, f, indent=1)
    shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items())
    log(f"done | {sampler} | NFE {nfe} per sample | {sec100:.2f} s per 100 samples" + (f" | {shown}" if shown else ""))


def sample_only(args, fail):
    """Generate from a checkpoint without the training flags (EMA weights of G)."""
    path = args.ckpt or os.path.join(args.out, "ckpt.pt")
    try:
        ckpt = load_checkpoint(path)
    except ValueError as e:
        fail(str(e))
    a = dict(ckpt["args"])
    a.update(seed=args.seed)
    device = pick_device(args.device)
    torch.set_flush_denormal(True)
    G, _ = build_models(a, a["channels"])
    G = G.to(device)
    G.load_state_dict(ckpt["ema"])
    G.eval()
    out = os.path.dirname(path) if args.ckpt and args.out == DEFAULT_OUT else args.out
    os.makedirs(out, exist_ok=True)
    n = args.n_samples or (2500 if data.is_2d(a["data"]) else 100)
    xs, nfe, sec100 = generate(a, G, n, device, args.dtype, args.seed)
    tag = f"T{a['T']}"
    real = data.load(a["data"], "test", seed=a["seed"])[0] if data.is_2d(a["data"]) else None
    save_samples(a, xs, os.path.join(out, f"samples_{tag}.png"), real)
    if args.save_npz:                                            # uint8 NHWC, as improved-diffusion writes for FID tools
        arr = xs if data.is_2d(a["data"]) else ((xs + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        tmp = os.path.join(out, f"samples_{tag}.tmp.npz")
        np.savez(tmp, arr_0=arr.numpy())
        os.replace(tmp, os.path.join(out, f"samples_{tag}.npz"))
    finish(a, xs, nfe, sec100, os.path.join(out, f"metrics_{tag}.json"), print, dict(step=ckpt["step"]))


# ----------------------------------------------------------------------------------------------------
# Command line
DEFAULT_OUT = "runs/ddgan"
# Training budgets that fit a laptop CPU (flags override them). The model-level defaults (T = 4, the VP betas,
# nz = 100, Adam (0.5, 0.9), R1 every 15 steps, EMA 0.9999) are the paper's; its CIFAR-10 run is in the README.
DEFAULTS = {
    "image": dict(steps=3000, batch_size=64, lr_g=1.6e-4, lr_d=1.25e-4, r1_gamma=0.02, lazy_reg=15, ema=0.9999,
                  n_samples=100, sample_every=500),
    "2d": dict(steps=32000, batch_size=256, lr_g=5e-4, lr_d=1e-3, r1_gamma=0.04, lazy_reg=4, ema=0.999,
               n_samples=2500, sample_every=4000),
}


def get_parser():
    p = argparse.ArgumentParser(description="DDGAN (Xiao et al. 2022): denoising diffusion GANs.", allow_abbrev=False)
    # data
    p.add_argument("--data", default="glyphs", help="glyphs | cifar10 | mnist | swirl | 25gaussians | path to an image folder")
    p.add_argument("--data-dir", default="./data", help="where cifar10/mnist are stored or downloaded")
    p.add_argument("--classes", nargs="+", default=None, help="keep these classes (names or indices)")
    p.add_argument("--image-size", type=int, default=16, help="images are resized to this size")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False, help="random horizontal flips")
    # diffusion
    p.add_argument("--T", type=int, default=4, help="number of denoising steps (the paper: 1, 2, 4 or 8; 4 on CIFAR-10)")
    p.add_argument("--beta-min", type=float, default=0.1, help="VP schedule b_min")
    p.add_argument("--beta-max", type=float, default=20.0, help="VP schedule b_max")
    # GAN
    p.add_argument("--nz", type=int, default=100, help="latent z dimension of the generator")
    p.add_argument("--no-z", action="store_true", help="ablation: no latent, a unimodal denoiser")
    p.add_argument("--r1-gamma", type=float, default=None, help="R1 weight gamma (default 0.02 images as the paper's CIFAR-10, 0.04 2-D)")
    p.add_argument("--lazy-reg", type=int, default=None, help="apply R1 every this many steps (0: never; default "
                   "15 images as the paper's CIFAR-10, 4 2-D)")
    # model
    p.add_argument("--ch", type=int, default=32, help="UNet base channels of G")
    p.add_argument("--ch-mult", type=int, nargs="+", default=[1, 2, 2], help="channel multiplier per level (G and D)")
    p.add_argument("--num-res-blocks", type=int, default=1, help="residual blocks per level of G (D has 1)")
    p.add_argument("--attn-res", type=int, nargs="*", default=[], help="resolutions with self-attention in G, e.g. 16")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout in G's residual blocks")
    p.add_argument("--temb-dim", type=int, default=None, help="time-embedding width of G (default 4 * ch)")
    p.add_argument("--d-ch", type=int, default=None, help="base channels of D (default: --ch)")
    p.add_argument("--hidden", type=int, default=256, help="2-D MLP width (G and D; the paper's toy: 512)")
    p.add_argument("--layers", type=int, default=3, help="2-D MLP hidden layers (G and D)")
    # training
    p.add_argument("--steps", type=int, default=None, help="training iterations, each one D and one G step (default: 3000 images, 32000 2-D)")
    p.add_argument("--batch-size", type=int, default=None, help="batch per process (default: 64 images, 256 2-D)")
    p.add_argument("--lr", type=float, default=None, help="set both --lr-g and --lr-d")
    p.add_argument("--lr-g", type=float, default=None, help="G's peak learning rate (the paper's 1.6e-4)")
    p.add_argument("--lr-d", type=float, default=None, help="D's peak learning rate (the paper's 1.25e-4)")
    p.add_argument("--lr-min", type=float, default=1e-5, help="floor of the cosine decay (the paper's 1e-5)")
    p.add_argument("--warmup", type=int, default=0, help="linear lr warm-up steps (the paper: none)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine", help="lr decay (the paper's cosine)")
    p.add_argument("--grad-clip", type=float, default=0.0, help="gradient-norm clipping of G and D (0: off, the paper)")
    p.add_argument("--ema", type=float, default=None, help="EMA decay of G's sampling weights (default 0.9999 "
                   "images as the paper's, 0.999 2-D)")
    # output and runtime
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for ckpt.pt, samples, log.txt, metrics.json")
    p.add_argument("--n-samples", type=int, default=None, help="samples per grid / final evaluation")
    p.add_argument("--sample-every", type=int, default=None, help="save a sample grid every this many steps (0: end only)")
    p.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every this many steps")
    p.add_argument("--log-every", type=float, default=5.0, help="seconds between log lines")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--sample-only", action="store_true", help="only sample from a checkpoint (OUT/ckpt.pt or --ckpt)")
    p.add_argument("--ckpt", default=None, help="checkpoint for --sample-only (default OUT/ckpt.pt)")
    p.add_argument("--save-npz", action="store_true", help="with --sample-only: also save the samples as uint8 .npz")
    p.add_argument("--seed", type=int, default=0, help="random seed (rank is added under DDP)")
    p.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto", help="where to run")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="autocast dtype of the networks")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile G (D stays eager: R1)")
    return p


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.T < 1:
        parser.error("--T must be at least 1")
    if args.sample_only:
        return sample_only(args, parser.error)
    if args.lr is not None:
        args.lr_g = args.lr if args.lr_g is None else args.lr_g
        args.lr_d = args.lr if args.lr_d is None else args.lr_d
    for k, v in DEFAULTS["2d" if data.is_2d(args.data) else "image"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("steps", "batch_size", "n_samples", "ckpt_every", "nz"):
        if getattr(args, k) < 1:
            parser.error(f"--{k.replace('_', '-')} must be at least 1")
    if args.r1_gamma < 0 or args.lazy_reg < 0:
        parser.error("--r1-gamma and --lazy-reg must be non-negative")
    threads = torch.get_num_threads()
    if data.is_2d(args.data) and pick_device(args.device) == "cpu":
        torch.set_num_threads(1)   # 2-D MLPs: thread sync costs more than it gives (30 vs 12 steps/s on 2 cores)
    try:
        train(args, parser.error)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
