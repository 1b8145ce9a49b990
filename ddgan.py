"""DDGAN: Denoising Diffusion GANs (Xiao, Kreis & Vahdat 2022, "Tackling the generative learning trilemma with
denoising diffusion GANs", arXiv 2112.07804).

Idea: a diffusion model with only T = 1..8 steps. Its steps are so large that the true denoising
distribution q(x_{t-1} | x_t) is multimodal, so it is not modelled by a Gaussian but by a conditional GAN.
The generator G(x_t, t, z) predicts a clean x0_hat; the fake x_{t-1} is drawn from the Gaussian posterior
q(x_{t-1} | x_t, x0_hat) (Eq. 7 of DDPM, Sec. 4.3 here), so the latent z makes p(x_{t-1} | x_t) multimodal.
A time-dependent discriminator D(x_{t-1}, x_t, t) tells real pairs from the forward process (Eq. 4) apart
from fake pairs; the adversarial loss (Eqs. 5-6) uses softplus on logits, the non-saturating G loss and a
lazy R1 penalty on the real x_{t-1}. Sampling costs T network calls (NFE = T).

Where the image defaults differ from the paper (each measured against it in docs/experiments.md): a
16-channel G, a small spectrally normalised D (--disc small), the hinge loss (--loss hinge), 2 D steps per
G step (--d-steps 2), the G step reusing the last D step's fake (--share-fake, 1.2x faster), Adam lr 2e-4 for
both, constant, no R1, and 7500 steps. In a CPU budget of a few thousand updates the paper's D goes flat and G
stops learning. The paper's setting is one set of flags away:
       --disc paper --loss softplus --d-steps 1 --no-share-fake --lr-g 1.6e-4 --lr-d 1.25e-4 --lr-schedule cosine
       --r1-gamma 0.02 --lazy-reg 15 --ch 128 --ch-mult 1 2 2 2 --num-res-blocks 2 --attn-res 16

Run:   python ddgan.py [--T 8] [--no-z]                 # glyphs-mono 16x16, T=4 (or 8; --no-z: the paper's ablation)
       python ddgan.py --data 25gaussians               # 2-D mixture, 3-layer 256-wide MLPs for G and D, ~9 min
       python ddgan.py --sample-only --out runs/ddgan --save-npz
Python: G, cfg = ddgan.load("runs/ddgan/ckpt.pt"); x = ddgan.generate(G, cfg, n=64, seed=0)

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
import os
import time

import torch
import torch.nn.functional as F

import data
from unet import MLP, Discriminator, SmallDiscriminator, UNet


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
# finite for any logit (a sigmoid then a log is -inf from |logit| ~ 17 in float32, where 1 - sigmoid rounds to 0)
def d_loss(real_logits, fake_logits, kind="softplus"):
    """D: -log D(real) - log(1 - D(fake)) = softplus(-l_real) + softplus(l_fake), batch means (the paper's);
    kind="hinge": relu(1 - l_real) + relu(1 + l_fake) (Lim & Ye 2017, the CPU recipe: D stays alive)."""
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss(fake_logits, kind="softplus"):
    """G, non-saturating (Eq. 6 as implemented): -log D(fake) = softplus(-l_fake); with the hinge D: -l_fake."""
    return -fake_logits.mean() if kind == "hinge" else F.softplus(-fake_logits).mean()


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
# One training iteration (Alg. 1 of the paper's App.): D steps, then a G step, each on a draw of t, pair and z
def draw(gen, sched, x0, nz):
    """One draw of the game's inputs: t ~ U{1..T}, the real pair (x_{t-1}, x_t) from the forward process and a
    fake x_{t-1} ~ q(. | x_t, G(x_t, t, z)). Under no_grad for a D step; with grad when the G step reuses it."""
    t = torch.randint(1, len(sched["beta"]) + 1, (len(x0),), device=x0.device)
    x_prev, x_t = q_sample_pairs(sched, x0, t)
    z = torch.randn(len(x0), nz, device=x0.device) if nz else None
    return t, x_prev, x_t, sample_posterior(sched, gen(x_t, t, z), x_t, t)


def d_step(disc, D, opt_d, pair, r1_gamma=0.0, clip=0.0, loss_kind="softplus"):
    """D: real pair (x_{t-1}, x_t) vs fake pair (x_{t-1} ~ q(. | x_t, G(x_t, t, z)), x_t), G held fixed (the
    fake is detached); with r1_gamma > 0 also (gamma / 2) R1 on the real x_{t-1}. As in the official code the R1
    term is not scaled by the lazy interval (StyleGAN2 scales it), so the paper's gamma values mean the same here."""
    t, x_prev, x_t, fake_prev = pair
    x_prev = x_prev.detach().requires_grad_(r1_gamma > 0)
    real_logits, fake_logits = disc(x_prev, x_t, t), disc(fake_prev.detach(), x_t, t)   # G is held fixed
    loss = d_loss(real_logits, fake_logits, loss_kind)
    r1 = r1_penalty(real_logits, x_prev) if r1_gamma > 0 else torch.zeros((), device=x_t.device)
    opt_d.zero_grad(set_to_none=True)
    (loss + r1_gamma / 2 * r1).backward()
    norm = data.clip_grad(D, clip)
    opt_d.step()
    return dict(d=loss.detach(), real=real_logits.detach().mean(), fake=fake_logits.detach().mean(),
                r1=r1.detach()), norm


def g_step(disc, G, D, opt_g, pair, clip=0.0, loss_kind="softplus"):
    """G, non-saturating: -log D(fake x_{t-1}, x_t) through a frozen D; `pair` is a draw() made with grad."""
    t, _, x_t, fake_prev = pair
    D.requires_grad_(False)
    loss = g_loss(disc(fake_prev, x_t, t), loss_kind)
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    D.requires_grad_(True)
    norm = data.clip_grad(G, clip)
    opt_g.step()
    return loss.detach(), norm


# ----------------------------------------------------------------------------------------------------
# The networks, and sampling from a trained G
POINT_GAIN = 4.0


def build_models(a, in_ch):
    """G (x0 predictor with latent z) and D(cat(x_{t-1}, x_t), t): the shared UNet / Discriminator for images,
    MLPs for 2-D points (x0 predicted directly there: tanh cannot reach data at +-4)."""
    nz = 0 if a["no_z"] else a["nz"]
    if data.is_2d(a["data"]):
        # points enter both nets x POINT_GAIN (G's output is divided by it): with the natural scale (modes of std
        # 0.05 on a +-4 grid) the MLPs do not resolve the modes; D uses LeakyReLU(0.2) like the image D
        G = MLP(in_dim=2, hidden=a["hidden"], layers=a["layers"], z_dim=nz, in_scale=POINT_GAIN,
                out_scale=1 / POINT_GAIN)
        D = MLP(in_dim=4, out_dim=1, hidden=a["hidden"], layers=a["layers"], zero_out=False, act="lrelu",
                in_scale=POINT_GAIN)
        return G, D
    G = UNet(in_ch=in_ch, ch=a["ch"], ch_mult=tuple(a["ch_mult"]), num_res_blocks=a["num_res_blocks"],
             attn_res=tuple(a["attn_res"]), dropout=a["dropout"], temb_dim=a["temb_dim"],
             image_size=a["image_size"], z_dim=nz, out_act="tanh", zero_init=False)
    if a["disc"] == "small":   # the CPU recipe's D (a deviation; --disc paper is the paper's)
        return G, SmallDiscriminator(in_ch=2 * in_ch, ch=a["d_ch"] or 32, image_size=a["image_size"])
    return G, Discriminator(in_ch=2 * in_ch, ch=a["d_ch"] or a["ch"], ch_mult=tuple(a["ch_mult"]), num_res_blocks=1,
                            image_size=a["image_size"])


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


def load(path, device="cpu"):
    """(G, cfg) from a ckpt.pt: G's EMA weights in eval mode on `device`, and the run's settings."""
    ckpt = data.load_checkpoint(path, "ddgan", KEYS, ARCH)
    G, _ = build_models(ckpt["args"], ckpt["args"]["channels"])
    data.load_states(ckpt, path, ema=G)
    return G.to(device).eval(), dict(ckpt["args"], step=ckpt["step"])


@torch.no_grad()
def generate(G, cfg, n=64, seed=0, dtype="float32", batch=500, info=None):
    """n samples (images in [-1, 1] or 2-D points) from fixed noise (seed), T network calls each. `info` (a dict)
    receives the sampler's name, NFE and seconds per 100 samples, timed after one untimed network call."""
    sched, T, nz = make_schedule(cfg["T"], cfg["beta_min"], cfg["beta_max"]), cfg["T"], 0 if cfg["no_z"] else cfg["nz"]
    device, gen = next(G.parameters()).device, gen_fn(G, cfg["T"], dtype)
    g = torch.Generator(device).manual_seed(seed)
    shape = (2,) if data.is_2d(cfg["data"]) else (cfg["channels"], cfg["image_size"], cfg["image_size"])
    b0 = min(batch, n)
    gen(torch.zeros((b0,) + shape, device=device), torch.ones(b0, dtype=torch.long, device=device),
        torch.zeros(b0, nz, device=device) if nz else None)
    t0, out = time.time(), []
    for i in range(0, n, batch):
        out.append(sample(gen, sched, (min(batch, n - i),) + shape, nz, generator=g, device=device).cpu())
    if info is not None:
        info.update(sampler=f"ddgan_T{T}" + ("_noz" if cfg["no_z"] else ""), nfe=T, sec_per_100=100 * (time.time() - t0) / n)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------
# Training: d_step then g_step per iteration, in one flat loop; the run plumbing is in data.py
ARCH = ("data", "image_size", "channels", "classes", "T", "beta_min", "beta_max", "nz", "no_z", "ch", "ch_mult",
        "num_res_blocks", "attn_res", "dropout", "temb_dim", "disc", "d_ch", "hidden", "layers")   # what a checkpoint fixes
KEYS = ("G", "D", "ema", "opt_G", "opt_D")


def train(args):
    rank, world, device, ckpt, (x, y, _) = data.start_training(args, "ddgan", KEYS, ARCH)   # DDP, seeds, resume
    ckpt_path, a = os.path.join(args.out, "ckpt.pt"), vars(args)
    a["channels"] = 2 if data.is_2d(a["data"]) else x.shape[1]

    # models, optimizers (Adam betas (0.5, 0.9) for both, the paper's), EMA of G
    G, D = (m.to(device) for m in build_models(a, a["channels"]))
    ema = copy.deepcopy(G).requires_grad_(False).eval()        # sampling weights; eval(): no dropout
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(0.5, 0.9))
    step = data.resume_states(ckpt, world, ckpt_path, G=G, D=D, ema=ema, opt_G=opt_g, opt_D=opt_d)
    batches = data.batches(x, y, args.batch_size, args.flip, args.seed, device, start=step)
    real = data.reference(a, x, y)
    # D is never compiled: the R1 penalty needs a double backward, which torch.compile does not support
    gen = gen_fn(data.wrap_ddp(torch.compile(G) if args.compile else G, device), args.T, args.dtype)
    disc = disc_fn(data.wrap_ddp(D, device), args.T, args.dtype)
    sched, nz = make_schedule(args.T, args.beta_min, args.beta_max), 0 if args.no_z else args.nz

    os.makedirs(args.out, exist_ok=True)
    log = data.Log(args.out, rank == 0, step, args.steps, args.log_every)
    n_g, n_d = (sum(p.numel() for p in m.parameters()) for m in (G, D))
    log(f"ddgan | data {args.data} {tuple(x.shape)} | G {n_g / 1e6:.2f}M D {n_d / 1e6:.2f}M params | device {device} "
        f"x{world} | T {args.T} | nz {nz} | batch {args.batch_size} x{world} | steps {step}..{args.steps}")
    stats, avg = [], dict(d=float("nan"), g=float("nan"))
    while step < args.steps:
        # lr: optional linear warm-up, then constant or cosine decay to lr_min (the paper: cosine to 1e-5)
        lr_g = data.set_lr(opt_g, data.lr_at(step, args.steps, args.lr_g, args.warmup, args.lr_schedule, args.lr_min))
        lr_d = data.set_lr(opt_d, data.lr_at(step, args.steps, args.lr_d, args.warmup, args.lr_schedule, args.lr_min))
        x0, _ = next(batches)
        reg = args.lazy_reg > 0 and step % args.lazy_reg == 0    # R1 on every --lazy-reg-th step
        for k in range(args.d_steps):                            # the paper: 1; the CPU recipe: 2
            keep = args.share_fake and k == args.d_steps - 1     # --share-fake: the G step reuses this draw
            with torch.set_grad_enabled(keep):
                pair = draw(gen, sched, x0, nz)
            s, norm_d = d_step(disc, D, opt_d, pair, args.r1_gamma * (reg and k == 0), args.grad_clip, args.loss)
        if not args.share_fake:                                  # the paper: a fresh t, pair and z for G
            pair = draw(gen, sched, x0, nz)
        s["g"], norm_g = g_step(disc, G, D, opt_g, pair, args.grad_clip, args.loss)
        bad = data.diverged([s["d"], s["g"]], [norm_d, norm_g], [G, D])
        if bad:
            data.stop_diverged(log, step, bad, ckpt_path)
        step += 1
        data.ema_update(ema, G, args.ema, step)
        stats.append({k: v.item() for k, v in s.items()})

        if log.due(step):
            avg = {k: sum(v[k] for v in stats) / len(stats) for k in stats[0]}
            log.progress(step, f"loss D {avg['d']:.4f} G {avg['g']:.4f} | D(real) {avg['real']:+.2f} D(fake) "
                         f"{avg['fake']:+.2f} | r1 {max(v['r1'] for v in stats):.3g} | lr {lr_g:.2e}/{lr_d:.2e}")
            stats = []
        if rank == 0 and args.sample_every and step % args.sample_every == 0 and step < args.steps:
            with log.paused():                                   # sampling and scoring are not training time
                xs = generate(ema, a, args.n_samples, args.seed, args.dtype)
                data.save_samples(a, xs, os.path.join(args.out, f"samples_{step:07d}.png"), real)
                log(f"samples at step {step}: " + " | ".join(f"{k} {v:.4g}" for k, v in data.score(a, xs).items()))
        if rank == 0 and (step % args.ckpt_every == 0 or step == args.steps):
            data.save_checkpoint(ckpt_path, "ddgan", step, a, G=G, D=D, ema=ema, opt_G=opt_g, opt_D=opt_d)

    if rank == 0:
        info = {}
        xs = generate(ema, a, args.n_samples, args.seed, args.dtype, info=info)
        data.write_outputs(a, "ddgan", xs, info, args.out, log,
                           dict(step=step, loss=avg["d"] + avg["g"], loss_d=avg["d"], loss_g=avg["g"]), real,
                           save_npz_too=args.save_npz)
    data.teardown_ddp()


def sample_only(args):
    """--sample-only: load() and generate() from a checkpoint's EMA weights of G, without the training flags."""
    path = args.ckpt or os.path.join(args.out, "ckpt.pt")
    G, cfg = load(path, data.pick_device(args.device))
    cfg["seed"], info = args.seed, {}
    xs = generate(G, cfg, args.n_samples or (2500 if data.is_2d(cfg["data"]) else 100), args.seed, args.dtype, info=info)
    data.write_outputs(cfg, "ddgan", xs, info, data.sample_out(args, path, DEFAULT_OUT), print, dict(step=cfg["step"]),
                       tag=info["sampler"], save_npz_too=args.save_npz)


# ----------------------------------------------------------------------------------------------------
# Command line
DEFAULT_OUT = "runs/ddgan"
# Training budgets that fit a laptop CPU (flags override them). The model-level defaults (T = 4, the VP betas,
# nz = 100, Adam (0.5, 0.9), R1 every 15 steps, EMA 0.9999) are the paper's; its CIFAR-10 run is in the README.
DEFAULTS = {
    "data": "glyphs-mono", "lr_schedule_note": "; the paper's cosine", "grad_clip_note": "; the paper: off",
    "image": dict(steps=7500, batch_size=64, lr_g=2e-4, lr_d=2e-4, r1_gamma=0.0, lazy_reg=15, ema=0.9999,
                  warmup=0, lr_schedule="constant", grad_clip=0.0, n_samples=500, sample_every=500,
                  disc="small", loss="hinge", d_steps=2, share_fake=True),
    "2d": dict(steps=32000, batch_size=256, lr_g=5e-4, lr_d=1e-3, r1_gamma=0.04, lazy_reg=4, ema=0.999,
               warmup=0, lr_schedule="cosine", grad_clip=0.0, n_samples=2500, sample_every=4000,
               disc="paper", loss="softplus", d_steps=1, share_fake=False),
}


def get_parser():
    p = data.Parser(description="DDGAN (Xiao et al. 2022): denoising diffusion GANs.", allow_abbrev=False)
    _, model, training, _ = data.add_shared_args(p, DEFAULT_OUT, DEFAULTS, "glyphs | glyphs-mono | cifar10 | mnist | stackedmnist "
                                                 "| swirl | 25gaussians | path to an image folder", hidden=256, g=" of G")
    p.set_defaults(ch=16)                                        # a small G: steps per second matter more on a CPU
    model.add_argument("--disc", choices=["small", "paper"], default=None, help="D for images: small, a spectrally "
                       "normalised 3-conv D (default; a deviation for CPU budgets) or paper, the paper's residual D "
                       "with the time embedding in every block and minibatch std")
    model.add_argument("--d-ch", type=int, default=None, help="base channels of D (default: 32 small, --ch paper)")
    training.add_argument("--lr", type=float, default=None, help="set both --lr-g and --lr-d")
    training.add_argument("--lr-g", type=float, default=None, help="G's peak lr (default: 2e-4 images, 5e-4 2-D; the paper's 1.6e-4)")
    training.add_argument("--lr-d", type=float, default=None, help="D's peak lr (default: 2e-4 images, 1e-3 2-D; the paper's 1.25e-4)")
    training.add_argument("--lr-min", type=float, default=1e-5, help="floor of the cosine decay (the paper's 1e-5)")
    d = p.add_argument_group("diffusion and GAN")
    d.add_argument("--T", type=int, default=4, help="number of denoising steps (the paper: 1, 2, 4 or 8; 4 on CIFAR-10)")
    d.add_argument("--beta-min", type=float, default=0.1, help="VP schedule b_min")
    d.add_argument("--beta-max", type=float, default=20.0, help="VP schedule b_max")
    d.add_argument("--nz", type=int, default=100, help="latent z dimension of the generator")
    d.add_argument("--no-z", action="store_true", help="ablation: no latent, a unimodal denoiser")
    d.add_argument("--loss", choices=["hinge", "softplus"], default=None, help="adversarial loss: softplus on logits "
                   "with the non-saturating G loss (the paper's) or hinge (default for images: a deviation that keeps "
                   "D alive in a short run)")
    d.add_argument("--d-steps", type=int, default=None, help="D updates per G update (the paper's 1; default 2 for "
                   "images, a deviation)")
    d.add_argument("--share-fake", action=argparse.BooleanOptionalAction, default=None, help="G reuses the last D "
                   "step's draw (1.2x faster; default for images, a deviation); --no-share-fake: a fresh one (the paper)")
    d.add_argument("--r1-gamma", type=float, default=None, help="R1 weight gamma (default: 0 images, 0.04 2-D; the "
                   "paper's CIFAR-10 0.02)")
    d.add_argument("--lazy-reg", type=int, default=None, help="apply R1 every this many steps (0: never; default "
                   "15 images as the paper's CIFAR-10, 4 2-D)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.T < 1:
            raise ValueError("--T must be at least 1")
        if not args.sample_only:
            args.lr_g, args.lr_d = (args.lr if v is None else v for v in (args.lr_g, args.lr_d))   # --lr sets both
            data.apply_defaults(args, DEFAULTS)
            if min(args.nz, args.d_steps) < 1 or not (args.r1_gamma >= 0 and args.lazy_reg >= 0):
                raise ValueError("--nz and --d-steps must be at least 1, --r1-gamma and --lazy-reg >= 0")
        data.check_args(args)
        if args.sample_only:
            return sample_only(args)
        if data.is_2d(args.data) and data.pick_device(args.device) == "cpu":
            torch.set_num_threads(1)   # 2-D MLPs: thread sync costs more than it gives (30 vs 12 steps/s on 2 cores)
        train(args)
    except ValueError as e:
        data.die(f"ddgan.py: error: {e}")
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
