"""DDPM: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020, arXiv 2006.11239).

Idea: a fixed forward process adds Gaussian noise in T small steps,
q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), so that x_T is close to N(0, I). A network
eps_theta(x_t, t) learns to predict the noise in x_t (L_simple, Eq. 14), and Algorithm 2 walks back from
x_T ~ N(0, I) to x_0 one step at a time. DDIM (Song et al. 2021) samples the same network on a
sub-sequence of S << T steps. --cond adds class labels with classifier-free guidance (Ho & Salimans 2022):
labels are dropped to a null class with probability --p-uncond in training, and sampling uses
eps = (1 + w) eps(x_t, c) - w eps(x_t, null) with w = --guidance, as vdm.py does.

Run:   python ddpm.py                                  # glyphs 16x16, CPU-sized model, ~15 min on 2 cores
       python ddpm.py --data 25gaussians               # 2-D mixture, MLP denoiser
       python ddpm.py --sample-only --out runs/ddpm --sample-steps 50 --save-npz
       python ddpm.py --cond --out runs/ddpm_cond      # class-conditional glyphs; a row per digit

t convention: t runs over {1..T}; beta[t - 1] is beta_t, alpha_bar[t - 1] is alpha_bar_t and alpha_bar_0 = 1.
The network sees t rescaled to 1000 t / T, so the time embedding spans the same range for every T.
"""
import argparse
import copy
import math
import os
import time

import torch
import torch.nn.functional as F

import data
from unet import MLP


# ----------------------------------------------------------------------------------------------------
# Schedule
def make_schedule(T, kind="vp", beta_min=0.1, beta_max=20.0):
    """Return a dict of float32 tensors of length T (index t - 1 holds the value for step t).

    vp (the default): the continuous VP schedule alpha_bar(s) = exp(-0.5 s^2 (b_max - b_min) - s b_min), s = t / T.
      At T = 1000 its betas run from ~1e-4 to ~0.02, within 3e-4 of the paper's linear ones, and unlike those
      it stays valid (0 < beta < 1, alpha_bar_T ~ 4e-5) for every T, down to T = 1.
    linear: the paper's betas exactly, torch.linspace(1e-4, 0.02, T) (Sec. 4). Made for T = 1000: at smaller T
      alpha_bar_T stays far from 0 (0.132 at T = 200, 0.603 at T = 50, 0.82 at T = 20), so x_T is not N(0, I)
      and sampling from pure noise gives noise. That is why vp is the default.
    cosine: Nichol & Dhariwal 2021, alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) pi/2),
      s = 0.008, with beta clipped at 0.999.
    """
    s = torch.arange(T + 1, dtype=torch.float64) / T                  # s_0 = 0 .. s_T = 1
    if kind == "vp":
        log_ab = -0.5 * s ** 2 * (beta_max - beta_min) - s * beta_min
        beta = -torch.expm1(log_ab[1:] - log_ab[:-1])                   # 1 - ab_t / ab_{t-1}, exact for tiny beta
    elif kind == "linear":
        beta = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
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
    """Eq. 14 (L_simple): || eps - eps_theta(sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, t, y) ||^2, t ~ U{1..T}
    (y: class labels, -1 the null class, or None)."""
    T = len(sched["beta"])
    t = torch.randint(1, T + 1, (x0.shape[0],), device=x0.device)
    eps = torch.randn_like(x0)
    return F.mse_loss(net(q_sample(sched, x0, t, eps), t, y), eps)


# ----------------------------------------------------------------------------------------------------
# Samplers. `net(x_t, t, y)` returns eps_hat for integer t in {1..T}; only the current x_t is kept,
# so memory does not grow with T. A long run prints a progress line (step, steps/s, ETA) every few seconds.
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
    T, t0 = len(sched["beta"]), time.time()
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
        data.progress(T - step + 1, T, t0, "steps")                   # a line every few seconds on long runs
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
    steps, t0 = ddim_steps(len(sched["beta"]), S), time.time()
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
        data.progress(i + 1, len(steps), t0, "steps")
    return x


# ----------------------------------------------------------------------------------------------------
# The model, and sampling from it
def build_model(a, in_ch):
    """The denoiser: the shared UNet for images (with --cond, a label embedding plus a null class), the MLP for
    2-D points."""
    if data.is_2d(a["data"]):
        return MLP(in_dim=2, hidden=a["hidden"], layers=a["layers"])
    return data.build_unet(a, in_ch, num_classes=len(a["class_names"]) if a["cond"] else 0)


def eps_fn(model, T, dtype, w=0.0):
    """Wrap the network as eps_theta(x_t, t, y): t in {1..T} is rescaled to 1000 t / T; only the network runs
    under autocast, the schedule math stays in float32. With labels y and w != 0, classifier-free guidance
    (Ho & Salimans 2022) eps = (1 + w) eps(x_t, c) - w eps(x_t, null), in one batch of 2B (w = 0: the conditional
    model); y = -1 is the null class."""
    def net(x, t, y=None):
        guide = y is not None and w != 0
        if guide:
            x, t, y = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, -1)])   # (2B, ...)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            eps = model(x, t.float() * (1000.0 / T), y).float()
        return (1 + w) * eps.chunk(2)[0] - w * eps.chunk(2)[1] if guide else eps
    return net


def sampler_name(cfg):
    """The sampler in words, e.g. ancestral_beta, ddim50_eta0.0 or, conditional, ancestral_beta_w1.0_labels3
    (file names and metrics.json)."""
    if cfg.get("sample_steps"):
        name = f"ddim{len(ddim_steps(cfg['T'], cfg['sample_steps']))}_eta{cfg['eta']}"
    else:
        name = f"ancestral_{cfg['var']}"
    return name + data.guidance_tag(cfg)


def load(path, device="cpu"):
    """(model, cfg) from a ckpt.pt: the EMA weights in eval mode on `device`, and the run's settings."""
    ckpt = data.load_checkpoint(path, "ddpm", KEYS, ARCH + ("var", "eta", "clip_x0"), upgrade)
    model = build_model(ckpt["args"], ckpt["args"]["channels"])
    data.load_states(ckpt, path, ema=model)
    return model.to(device).eval(), dict(ckpt["args"], step=ckpt["step"])


@torch.no_grad()
def generate(model, cfg, n=64, seed=0, sample_steps=None, eta=None, var=None, clip_x0=None, dtype="float32",
             batch=500, info=None, guidance=None, labels=None):
    """n samples (images in [-1, 1] or 2-D points) from fixed noise (seed): Alg. 2 over all T steps, or DDIM on
    sample_steps; unset options come from cfg. A conditional model draws a row per class of `labels` (default all),
    n // rows each, with guidance w. `info` (a dict) receives the sampler's name, NFE, seconds per 100 samples
    (timed after one untimed network call: one-time set-up is not sampling time), `labels` (each sample's class)
    and `nrow` (or None)."""
    cfg = dict(cfg, sample_steps=sample_steps or cfg.get("sample_steps"), labels=labels or cfg.get("labels"),
               guidance=cfg.get("guidance") if guidance is None else guidance,
               **{k: cfg[k] if v is None else v for k, v in dict(eta=eta, var=var, clip_x0=clip_x0).items()})
    device, T, S = next(model.parameters()).device, cfg["T"], cfg["sample_steps"]
    if S is not None and not 1 <= S <= T:
        raise ValueError(f"--sample-steps {S} is larger than the checkpoint's T={T}" if S > T else
                         "--sample-steps must be at least 1")
    w = cfg["guidance"] if cfg["cond"] else 0.0
    ys = data.grid_labels(cfg["class_names"], cfg["labels"], n).to(device) if cfg["cond"] else None
    n = len(ys) if cfg["cond"] else n
    sched, net = make_schedule(T, cfg["schedule"]), eps_fn(model, T, dtype, w)
    g = torch.Generator(device).manual_seed(seed)
    shape = (2,) if data.is_2d(cfg["data"]) else (cfg["channels"], cfg["image_size"], cfg["image_size"])
    net(torch.zeros((min(batch, n),) + shape, device=device), torch.ones(min(batch, n), dtype=torch.long, device=device))
    t0, out = time.time(), []
    for i in range(0, n, batch):
        b, y = (min(batch, n - i),) + shape, ys[i:i + batch] if cfg["cond"] else None
        if S:
            out.append(sample_ddim(net, sched, b, S, cfg["eta"], cfg["clip_x0"], y, g, device).cpu())
        else:
            out.append(sample_ancestral(net, sched, b, cfg["var"], cfg["clip_x0"], y, g, device).cpu())
        data.progress(i + b[0], n, t0, "samples")
    if info is not None:
        info.update(sampler=sampler_name(cfg), nfe=(len(ddim_steps(T, S)) if S else T) * (2 if w else 1),
                    sec_per_100=100 * (time.time() - t0) / n, labels=ys.cpu() if cfg["cond"] else None,
                    nrow=int((ys == ys[0]).sum()) if cfg["cond"] else None)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------
# Training (Algorithm 1) in one flat step loop; the run plumbing (DDP, checkpoints, log) is in data.py
ARCH = ("data", "image_size", "channels", "classes", "class_names", "T", "schedule", "cond", "ch", "ch_mult",
        "num_res_blocks", "attn_res", "dropout", "temb_dim", "hidden", "layers")   # what a checkpoint fixes
KEYS = ("model", "ema", "opt")                                   # the state dicts a checkpoint holds
VERSION = 2                                                      # of a checkpoint's settings, see upgrade()


def upgrade(a):
    """Bring the settings `a` of an older checkpoint up to VERSION, in place. Version 1 (no "version" key) names the
    VP curve "linear", which in version 2 is the paper's exact linspace, so a version-1 "linear" becomes "vp". A
    checkpoint without a "cond" setting is unconditional."""
    if a.get("version", 1) < 2:
        a.update(schedule="vp" if a.get("schedule") == "linear" else a.get("schedule"), version=2)
    for k, v in dict(cond=False, class_names=[], p_uncond=0.0, guidance=0.0, labels=None).items():
        a.setdefault(k, v)


def train(args):
    rank, world, device, ckpt, (x, y, names) = data.start_training(args, "ddpm", KEYS, ARCH, upgrade)   # DDP, resume
    ckpt_path, a = os.path.join(args.out, "ckpt.pt"), vars(args)
    a["version"], a["class_names"] = VERSION, a.get("class_names") or names
    a["channels"] = 2 if data.is_2d(a["data"]) else x.shape[1]
    if a["cond"] and not a["class_names"]:
        raise ValueError(f"--cond needs labelled image data; {a['data']} has no classes")
    data.grid_labels(a["class_names"], a["labels"], 1) if a["cond"] else None  # reject a bad --labels now

    model = build_model(a, a["channels"]).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()     # sampling weights; eval(): no dropout
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    step = data.resume_states(ckpt, world, ckpt_path, model=model, ema=ema, opt=opt)
    batches = data.batches(x, y, args.batch_size, args.flip, args.seed, device, start=step)
    real = data.reference(a, x, y)
    net = eps_fn(data.wrap_ddp(torch.compile(model) if args.compile else model, device), args.T, args.dtype)
    sched = make_schedule(args.T, args.schedule)

    os.makedirs(args.out, exist_ok=True)
    log = data.Log(args.out, rank == 0, step, args.steps, args.log_every)
    log(f"ddpm | data {args.data} {tuple(x.shape)} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params "
        f"| device {device} x{world} | T {args.T} {args.schedule}{' cond' if a['cond'] else ''} "
        f"| batch {args.batch_size} x{world} "
        f"| steps {step}..{args.steps}")
    losses, loss_avg = [], float("nan")
    while step < args.steps:
        lr = data.set_lr(opt, data.lr_at(step, args.steps, args.lr, args.warmup, args.lr_schedule))
        x0, y0 = next(batches)
        y0 = torch.where(torch.rand(len(y0), device=device) < args.p_uncond, -1, y0) if a["cond"] else None  # -1: null
        loss = loss_simple(net, sched, x0, y0)                   # Alg. 1, lines 2-5
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = data.clip_grad(model, args.grad_clip)
        opt.step()
        bad = data.diverged([loss], [grad_norm], [model])
        if bad:
            data.stop_diverged(log, step, bad, ckpt_path)
        step += 1
        data.ema_update(ema, model, args.ema, step)
        losses.append(loss.item())

        if log.due(step):
            log.progress(step, f"loss {sum(losses) / len(losses):.4f} | lr {lr:.2e}")
            loss_avg, losses = sum(losses) / len(losses), []
        data.sample_grid(args, a, step, rank, log, real,
                         lambda info: generate(ema, a, args.n_samples, args.seed, dtype=args.dtype, info=info))
        if rank == 0 and (step % args.ckpt_every == 0 or step == args.steps):
            data.save_checkpoint(ckpt_path, "ddpm", step, a, model=model, ema=ema, opt=opt)

    if rank == 0:
        info = {}
        xs = generate(ema, a, args.n_samples, args.seed, dtype=args.dtype, info=info)
        data.write_outputs(a, "ddpm", xs, info, args.out, log, dict(step=step, loss=loss_avg), real,
                           save_npz_too=args.save_npz, labels=info["labels"], nrow=info["nrow"])
    data.teardown_ddp()


def sample_only(args):
    """--sample-only: load() and generate() from a checkpoint's EMA weights, without the training flags."""
    path = args.ckpt or os.path.join(args.out, "ckpt.pt")
    model, cfg = load(path, data.pick_device(args.device))
    data.check_labels(cfg, args.labels)                          # fails before anything is written
    cfg["seed"], info = args.seed, {}
    n = args.n_samples or (2500 if data.is_2d(cfg["data"]) else 100)
    xs = generate(model, cfg, n, args.seed, args.sample_steps, args.eta, args.var, args.clip_x0, args.dtype, info=info,
                  guidance=args.guidance, labels=args.labels)
    data.write_outputs(cfg, "ddpm", xs, info, data.sample_out(args, path, DEFAULT_OUT), print, dict(step=cfg["step"]),
                       tag=info["sampler"], save_npz_too=args.save_npz, labels=info["labels"], nrow=info["nrow"])


# ----------------------------------------------------------------------------------------------------
# Command line
DEFAULT_OUT = "runs/ddpm"
# Training budgets that fit a laptop CPU (flags override them). The model-level defaults (T, schedule,
# eps-prediction) are the paper's; the paper's CIFAR-10 run is in the README.
DEFAULTS = {
    "data": "glyphs", "lr_note": "; the paper's 2e-4", "warmup_note": "; the paper's 5000",
    "lr_schedule_note": "; the paper's constant",
    "image": dict(steps=5000, batch_size=64, lr=1e-3, warmup=200, lr_schedule="cosine", grad_clip=1.0, ema=0.9999,
                  n_samples=100, sample_every=2500, clip_x0=True),
    "2d": dict(steps=20000, batch_size=512, lr=1e-3, warmup=100, lr_schedule="cosine", grad_clip=1.0, ema=0.9999,
               n_samples=2500, sample_every=5000, clip_x0=False),
}


def get_parser():
    p = data.Parser(description="DDPM (Ho et al. 2020) with DDIM sampling.", allow_abbrev=False)
    data.add_shared_args(p, DEFAULT_OUT, DEFAULTS, "glyphs | glyphs-mono | cifar10 | mnist | stackedmnist | swirl | 25gaussians "
                         "| path to an image folder")
    d = p.add_argument_group("diffusion and sampling")
    d.add_argument("--T", type=int, default=1000, help="number of diffusion steps")
    d.add_argument("--schedule", choices=["vp", "linear", "cosine"], default="vp", help="beta schedule: vp, the "
                   "continuous VP curve (~ the paper's at T=1000, valid for every T); linear, the paper's exact "
                   "1e-4..0.02 (alpha_bar_T far from 0 below T~500); cosine (Nichol & Dhariwal)")
    d.add_argument("--var", choices=["beta", "beta_tilde"], default="beta", help="sampling variance sigma_t^2 of Alg. 2")
    d.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                   help="clip x0_hat to [-1, 1] while sampling (default: on for images, off for 2-D)")
    d.add_argument("--sample-steps", type=int, default=None, help="sample with DDIM on this many steps "
                   "(default: Alg. 2 over all T)")
    d.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 ancestral")
    data.add_guidance_args(d)                                    # --cond, --p-uncond, --guidance, --labels
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        if args.T < 1:
            raise ValueError("--T must be at least 1")
        if args.sample_steps is not None and not (1 <= args.sample_steps and (args.sample_only or args.sample_steps <= args.T)):
            raise ValueError(f"--sample-steps must be between 1 and --T ({args.T})")
        data.raise_first([(not 0 <= args.p_uncond < 1, "--p-uncond must be in [0, 1)"),
                          (args.labels and not args.cond and not args.sample_only, "--labels needs --cond")])
        if not args.sample_only:
            data.apply_defaults(args, DEFAULTS)
        data.check_args(args)
        return sample_only(args) if args.sample_only else train(args)
    except ValueError as e:
        data.die(f"ddpm.py: error: {e}")


if __name__ == "__main__":
    main()
