"""DDPM: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020, arXiv 2006.11239).

Idea: a fixed forward process adds Gaussian noise in T small steps,
q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), so that x_T is close to N(0, I). A network
eps_theta(x_t, t) learns to predict the noise in x_t (L_simple, Eq. 14), and Algorithm 2 walks back from
x_T ~ N(0, I) to x_0 one step at a time. DDIM (Song et al. 2021) samples the same network on a
sub-sequence of S << T steps.

Run:   python ddpm.py                                  # glyphs 16x16, CPU-sized model, ~15 min on 2 cores
       python ddpm.py --data 25gaussians               # 2-D mixture, MLP denoiser
       python ddpm.py --sample-only --out runs/ddpm --sample-steps 50 --save-npz

t convention: t runs over {1..T}; beta[t - 1] is beta_t, alpha_bar[t - 1] is alpha_bar_t and alpha_bar_0 = 1.
The network sees t rescaled to 1000 t / T, so the time embedding spans the same range for every T.
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
from unet import MLP, UNet


# ----------------------------------------------------------------------------------------------------
# Schedule
def make_schedule(T, kind="linear", beta_min=0.1, beta_max=20.0):
    """Return a dict of float32 tensors of length T (index t - 1 holds the value for step t).

    linear: the continuous VP schedule alpha_bar(s) = exp(-0.5 s^2 (b_max - b_min) - s b_min), s = t / T.
      At T = 1000 its betas run from ~1e-4 to ~0.02 (the paper's linear schedule), and unlike scaling
      those endpoints it stays valid (0 < beta < 1, alpha_bar_T ~ 4e-5) for every T, down to T = 1.
    cosine: Nichol & Dhariwal 2021, alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) pi/2),
      s = 0.008, with beta clipped at 0.999.
    """
    s = torch.arange(T + 1, dtype=torch.float64) / T                  # s_0 = 0 .. s_T = 1
    if kind == "linear":
        log_ab = -0.5 * s ** 2 * (beta_max - beta_min) - s * beta_min
        beta = -torch.expm1(log_ab[1:] - log_ab[:-1])                   # 1 - ab_t / ab_{t-1}, exact for tiny beta
    elif kind == "cosine":
        f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        beta = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    alpha = 1 - beta
    alpha_bar = torch.cumprod(alpha, 0)
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    # Posterior q(x_{t-1} | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, beta_tilde I), Eqs. 6-7.
    beta_tilde = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
    coef_x0 = beta * alpha_bar_prev.sqrt() / (1 - alpha_bar)
    coef_xt = (1 - alpha_bar_prev) * alpha.sqrt() / (1 - alpha_bar)
    sched = dict(beta=beta, alpha=alpha, alpha_bar=alpha_bar, alpha_bar_prev=alpha_bar_prev,
                 beta_tilde=beta_tilde, coef_x0=coef_x0, coef_xt=coef_xt)
    return {k: v.float() for k, v in sched.items()}


def at(v, t, x):
    """Gather schedule values for integer steps t in {1..T} (B,), shaped to broadcast against x."""
    return v.to(x.device)[t - 1].view(-1, *([1] * (x.dim() - 1)))


# ----------------------------------------------------------------------------------------------------
# Forward process and loss (Algorithm 1)
def q_sample(sched, x0, t, eps):
    """Eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    ab = at(sched["alpha_bar"], t, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def q_posterior(sched, x0, x_t, t):
    """Eqs. 6-7: mean and variance of q(x_{t-1} | x_t, x_0)."""
    mean = at(sched["coef_x0"], t, x_t) * x0 + at(sched["coef_xt"], t, x_t) * x_t
    return mean, at(sched["beta_tilde"], t, x_t)


def loss_simple(net, sched, x0, y=None):
    """Eq. 14 (L_simple): || eps - eps_theta(sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, t) ||^2, t ~ U{1..T}."""
    T = len(sched["beta"])
    t = torch.randint(1, T + 1, (x0.shape[0],), device=x0.device)
    eps = torch.randn_like(x0)
    return F.mse_loss(net(q_sample(sched, x0, t, eps), t, y), eps)


# ----------------------------------------------------------------------------------------------------
# Samplers. `net(x_t, t, y)` returns eps_hat for integer t in {1..T}; only the current x_t is kept,
# so memory does not grow with T.
def predict_x0(sched, x_t, t, eps_hat, clip):
    """x0_hat = (x_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t), optionally clipped to the data range [-1, 1]."""
    ab = at(sched["alpha_bar"], t, x_t)
    x0_hat = (x_t - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
    return x0_hat.clamp(-1, 1) if clip else x0_hat


@torch.no_grad()
def sample_ancestral(net, sched, shape, var="beta", clip=True, y=None, generator=None, device="cpu"):
    """Algorithm 2: x_T ~ N(0, I); for t = T..1: x_{t-1} = mu(x_t, x0_hat) + sigma_t z, no noise at t = 1.

    mu is the posterior mean of Eq. 7 at x0_hat, which equals Eq. 11's
    1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - ab_t) eps_hat) when x0_hat is not clipped.
    var: sigma_t^2 = beta_t ("beta", the released CIFAR-10 run) or beta_tilde_t ("beta_tilde").
    """
    T = len(sched["beta"])
    x = torch.randn(shape, generator=generator, device=device)
    for step in range(T, 0, -1):
        t = torch.full((shape[0],), step, device=device, dtype=torch.long)
        x0_hat = predict_x0(sched, x, t, net(x, t, y), clip)
        mean, beta_tilde = q_posterior(sched, x0_hat, x, t)
        if step > 1:                                                   # Alg. 2, line 3: z = 0 at t = 1
            sigma2 = at(sched["beta"], t, x) if var == "beta" else beta_tilde
            x = mean + sigma2.sqrt() * torch.randn(shape, generator=generator, device=device)
        else:
            x = mean
    return x


def ddim_steps(T, S):
    """S evenly spaced steps of {1..T}, from T down to 1 (S = T gives every step)."""
    if S == 1:
        return [T]
    return sorted({round(1 + i * (T - 1) / (S - 1)) for i in range(S)}, reverse=True)


@torch.no_grad()
def sample_ddim(net, sched, shape, S, eta=0.0, clip=True, y=None, generator=None, device="cpu"):
    """DDIM (Song et al. 2021, Eq. 12) on S steps tau of {1..T}:
    x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - s^2) eps_hat + s z,
    s = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev). eta = 0 is deterministic;
    eta = 1 on every step is Algorithm 2 with sigma^2 = beta_tilde.
    """
    ab_all = torch.cat([torch.ones(1), sched["alpha_bar"]]).to(device)   # ab_all[t] = alpha_bar_t, ab_0 = 1
    steps = ddim_steps(len(sched["beta"]), S)
    x = torch.randn(shape, generator=generator, device=device)
    for i, step in enumerate(steps):
        prev = steps[i + 1] if i + 1 < len(steps) else 0
        t = torch.full((shape[0],), step, device=device, dtype=torch.long)
        x0_hat = predict_x0(sched, x, t, net(x, t, y), clip)
        ab_t, ab_prev = ab_all[step], ab_all[prev]
        eps_hat = (x - ab_t.sqrt() * x0_hat) / (1 - ab_t).sqrt()       # consistent with the clipped x0_hat
        s = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
        x = ab_prev.sqrt() * x0_hat + (1 - ab_prev - s ** 2).clamp(min=0).sqrt() * eps_hat
        if prev > 0 and eta > 0:
            x = x + s * torch.randn(shape, generator=generator, device=device)
    return x


# ----------------------------------------------------------------------------------------------------
# Plumbing: device, model, checkpoint (the same shape in every method file)
def pick_device(name):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def build_model(a, in_ch):
    """The denoiser: the shared UNet for images, the MLP for 2-D points."""
    if data.is_2d(a["data"]):
        return MLP(in_dim=2, hidden=a["hidden"], layers=a["layers"])
    return UNet(in_ch=in_ch, ch=a["ch"], ch_mult=tuple(a["ch_mult"]), num_res_blocks=a["num_res_blocks"],
                attn_res=tuple(a["attn_res"]), dropout=a["dropout"], temb_dim=a["temb_dim"],
                image_size=a["image_size"])


def eps_fn(model, T, dtype):
    """Wrap the network as eps_theta(x_t, t, y): t in {1..T} is rescaled to 1000 t / T; only the network runs
    under autocast, the schedule math stays in float32."""
    def net(x, t, y=None):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            return model(x, t.float() * (1000.0 / T)).float()
    return net


def save_checkpoint(path, obj):
    """Write atomically: a crash mid-write never leaves a half-written ckpt.pt."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path):
    """Load a ddpm checkpoint or raise ValueError with one clear line."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}") from None
    if not isinstance(ckpt, dict) or ckpt.get("method") != "ddpm":
        found = ckpt.get("method") if isinstance(ckpt, dict) else None
        raise ValueError(f"{path} is not a ddpm checkpoint (method: {found})")
    return ckpt


@torch.no_grad()
def generate(a, model, n, device, dtype="float32", seed=0, batch=500):
    """Sample n items with the sampler chosen by --sample-steps/--var/--eta, from fixed noise (seed).
    Returns (samples on cpu, NFE per sample, seconds per 100 samples)."""
    sched, T = make_schedule(a["T"], a["schedule"]), a["T"]
    net = eps_fn(model, T, dtype)
    g = torch.Generator(device).manual_seed(seed)
    shape = (2,) if data.is_2d(a["data"]) else (a["channels"], a["image_size"], a["image_size"])
    S = a.get("sample_steps") or T
    b0 = min(batch, n)   # one untimed network call: one-time set-up is not sampling time (the same in every method)
    net(torch.zeros((b0,) + shape, device=device), torch.ones(b0, dtype=torch.long, device=device))
    t0, out = time.time(), []
    for i in range(0, n, batch):
        b = (min(batch, n - i),) + shape
        if a.get("sample_steps"):
            out.append(sample_ddim(net, sched, b, S, a["eta"], a["clip_x0"], generator=g, device=device).cpu())
        else:
            out.append(sample_ancestral(net, sched, b, a["var"], a["clip_x0"], generator=g, device=device).cpu())
    sec = time.time() - t0
    return torch.cat(out), len(ddim_steps(T, S)) if a.get("sample_steps") else T, 100 * sec / n


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
# Training (Algorithm 1) in one flat step loop
ARCH = ("data", "image_size", "channels", "classes", "T", "schedule", "ch", "ch_mult", "num_res_blocks",
        "attn_res", "dropout", "temb_dim", "hidden", "layers")   # what a checkpoint fixes


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
    batches = data.batches(x, y, args.batch_size, flip=args.flip, seed=args.seed, device=device)
    # real data drawn beside the samples: held-out points under a scatter, or a row of training images
    real = data.load(args.data, "test", seed=args.seed)[0] if data.is_2d(args.data) else x[:10]

    # model, optimizer, EMA
    try:
        model = build_model(a, a["channels"]).to(device)
    except ValueError as e:
        fail(str(e))
    ema = copy.deepcopy(model).requires_grad_(False).eval()     # sampling weights; eval(): no dropout
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
    train_model = torch.compile(model) if args.compile else model
    if ddp:
        train_model = DDP(train_model, device_ids=[device] if backend == "nccl" else None)
    sched = make_schedule(args.T, args.schedule)
    net = eps_fn(train_model, args.T, args.dtype)
    os.makedirs(args.out, exist_ok=True)

    def log(msg):
        if master:
            print(msg, flush=True)
            with open(os.path.join(args.out, "log.txt"), "a") as f:
                f.write(msg + "\n")

    def checkpoint():
        save_checkpoint(ckpt_path, dict(method="ddpm", model=model.state_dict(), ema=ema.state_dict(),
                                        opt=opt.state_dict(), step=step, args=a))

    n_params = sum(p.numel() for p in model.parameters())
    log(f"ddpm | data {args.data} {tuple(x.shape)} | {n_params / 1e6:.2f}M params | device {device} x{world} "
        f"| T {args.T} {args.schedule} | batch {args.batch_size} x{world} | steps {step}..{args.steps}")
    t_log, step_log, loss_sum, loss_n, loss_avg = time.time(), step, 0.0, 0, float("nan")
    while step < args.steps:
        # lr: linear warm-up, then constant (the paper) or cosine decay to 0
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        if args.lr_schedule == "cosine":
            lr *= 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x0, _ = next(batches)
        loss = loss_simple(net, sched, x0)
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
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1

        if time.time() - t_log > args.log_every or step == args.steps:
            loss_avg, rate = loss_sum / loss_n, (step - step_log) / (time.time() - t_log)
            eta = (args.steps - step) / max(rate, 1e-9)
            log(f"step {step:>7d}/{args.steps} | loss {loss_avg:.4f} | lr {lr:.2e} | {rate:.2f} steps/s "
                f"| eta {int(eta // 60)}m{int(eta % 60):02d}s")
            t_log, step_log, loss_sum, loss_n = time.time(), step, 0.0, 0
        if master and args.sample_every and step % args.sample_every == 0 and step < args.steps:
            t_sample = time.time()
            xs, _, _ = generate(a, ema, args.n_samples, device, args.dtype, args.seed)
            save_samples(a, xs, os.path.join(args.out, f"samples_{step:07d}.png"), real)
            t_log += time.time() - t_sample                               # keep sampling out of steps/s
        if master and (step % args.ckpt_every == 0 or step == args.steps):
            checkpoint()

    if master:
        xs, nfe, sec100 = generate(a, ema, args.n_samples, device, args.dtype, args.seed)
        save_samples(a, xs, os.path.join(args.out, "samples.png"), real)
        finish(a, xs, nfe, sec100, os.path.join(args.out, "metrics.json"), log, dict(step=step, loss=loss_avg))
    if ddp:
        torch.distributed.destroy_process_group()


def sampler_name(a):
    """The sampler in words, e.g. ancestral_beta or ddim50_eta0.0 (used in file names and metrics.json)."""
    if a.get("sample_steps"):
        return f"ddim{len(ddim_steps(a['T'], a['sample_steps']))}_eta{a['eta']}"
    return f"ancestral_{a['var']}"


def finish(a, xs, nfe, sec100, path, log, extra):
    """Score the samples, print the final line and write metrics.json (the same keys in every method)."""
    scores = score(a, xs)
    sampler = sampler_name(a)
    m = dict(method="ddpm", data=a["data"], sampler=sampler, nfe=nfe, sec_per_100=round(sec100, 4),
             n_samples=len(xs), **extra, **scores)
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
    if args.sample_steps and args.sample_steps > a["T"]:
        fail(f"--sample-steps {args.sample_steps} is larger than the checkpoint's T={a['T']}")
    a.update(sample_steps=args.sample_steps, eta=args.eta, var=args.var or a["var"],
             clip_x0=a["clip_x0"] if args.clip_x0 is None else args.clip_x0, seed=args.seed)
    device = pick_device(args.device)
    torch.set_flush_denormal(True)
    model = build_model(a, a["channels"]).to(device)
    model.load_state_dict(ckpt["ema"])
    model.eval()
    out = os.path.dirname(path) if args.ckpt and args.out == DEFAULT_OUT else args.out
    os.makedirs(out, exist_ok=True)
    n = args.n_samples or (2500 if data.is_2d(a["data"]) else 100)
    xs, nfe, sec100 = generate(a, model, n, device, args.dtype, args.seed)
    tag = sampler_name(a)
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
DEFAULT_OUT = "runs/ddpm"
# Training budgets that fit a laptop CPU (flags override them). The model-level defaults (T, schedule,
# eps-prediction) are the paper's; the paper's CIFAR-10 run is in the README.
DEFAULTS = {
    "image": dict(steps=5000, batch_size=64, lr=1e-3, warmup=200, lr_schedule="cosine", n_samples=100,
                  sample_every=2500, clip_x0=True),
    "2d": dict(steps=20000, batch_size=512, lr=1e-3, warmup=100, lr_schedule="cosine", n_samples=2500,
               sample_every=5000, clip_x0=False),
}


def get_parser():
    p = argparse.ArgumentParser(description="DDPM (Ho et al. 2020) with DDIM sampling.", allow_abbrev=False)
    # data
    p.add_argument("--data", default="glyphs", help="glyphs | cifar10 | mnist | swirl | 25gaussians | path to an image folder")
    p.add_argument("--data-dir", default="./data", help="where cifar10/mnist are stored or downloaded")
    p.add_argument("--classes", nargs="+", default=None, help="keep these classes (names or indices)")
    p.add_argument("--image-size", type=int, default=16, help="images are resized to this size")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False, help="random horizontal flips")
    # diffusion
    p.add_argument("--T", type=int, default=1000, help="number of diffusion steps")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="beta schedule")
    p.add_argument("--var", choices=["beta", "beta_tilde"], default="beta", help="sampling variance sigma_t^2 of Alg. 2")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None, help="clip x0_hat to [-1, 1] while sampling (default: on for images, off for 2-D)")
    p.add_argument("--sample-steps", type=int, default=None, help="sample with DDIM on this many steps (default: Alg. 2 over all T)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 ancestral")
    # model
    p.add_argument("--ch", type=int, default=32, help="UNet base channels")
    p.add_argument("--ch-mult", type=int, nargs="+", default=[1, 2, 2], help="UNet channel multiplier per level")
    p.add_argument("--num-res-blocks", type=int, default=1, help="residual blocks per UNet level")
    p.add_argument("--attn-res", type=int, nargs="*", default=[], help="resolutions with self-attention, e.g. 16")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout in the residual blocks (the paper's 0.1 on CIFAR-10; "
                   "a short run only underfits)")
    p.add_argument("--temb-dim", type=int, default=None, help="time-embedding width (default 4 * ch)")
    p.add_argument("--hidden", type=int, default=512, help="2-D MLP width")
    p.add_argument("--layers", type=int, default=3, help="2-D MLP hidden layers")
    # training
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 5000 images, 20000 2-D)")
    p.add_argument("--batch-size", type=int, default=None, help="batch per process (default: 64 images, 512 2-D)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3; the paper's 2e-4)")
    p.add_argument("--warmup", type=int, default=None, help="linear lr warm-up steps (the paper's 5000)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default=None, help="after warm-up (the paper's constant)")
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
    p.add_argument("--ckpt", default=None, help="checkpoint for --sample-only (default OUT/ckpt.pt)")
    p.add_argument("--save-npz", action="store_true", help="with --sample-only: also save the samples as uint8 .npz")
    p.add_argument("--seed", type=int, default=0, help="random seed (rank is added under DDP)")
    p.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto", help="where to run")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="autocast dtype of the network")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the network")
    return p


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.T < 1:
        parser.error("--T must be at least 1")
    if args.sample_steps is not None and not 1 <= args.sample_steps <= args.T and not args.sample_only:
        parser.error(f"--sample-steps must be between 1 and --T ({args.T})")
    if args.sample_steps is not None and args.sample_steps < 1:
        parser.error("--sample-steps must be at least 1")
    if args.sample_only:
        return sample_only(args, parser.error)
    for k, v in DEFAULTS["2d" if data.is_2d(args.data) else "image"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("steps", "batch_size", "n_samples", "ckpt_every"):
        if getattr(args, k) < 1:
            parser.error(f"--{k.replace('_', '-')} must be at least 1")
    train(args, parser.error)


if __name__ == "__main__":
    main()
