"""VDM: Variational Diffusion Models (Kingma, Salimans, Poole & Ho 2021, arXiv 2107.00630). The README has the method,
the paper-to-code table and the commands (`python vdm.py`: glyphs 16x16, ~10 min on 2 CPU cores). gamma(t) = -log SNR(t)
sets q(z_t | x) = N(alpha_t x, sigma_t^2 I), alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t) (Sec. 3.1-3.2).
The loss is the negative ELBO in bits/dim (Sec. 3.5), its diffusion term discrete (Sec. 4) or continuous (Sec. 5);
sampling is ancestral, p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t)) (Sec. 3.3), then the argmax of the 256 logits.

t convention: t in [0, 1] is continuous, gamma(0) = gamma_0 the least noise, gamma(1) = gamma_1 the most; --T N
makes the diffusion loss discrete on t in {1/N, ..., 1}, s = t - 1/N. The sampler walks t_i = i/S, i = S..1 (S =
--sample-steps: default T, or 1000 in continuous time). The network sees 1000 (gamma_t + 13.3) / 18.3.
"""
import argparse
import copy
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from unet import MLP

GAMMA_MIN, GAMMA_MAX = -13.3, 5.0                                 # the paper's initial (or fixed) endpoints
to_int = data.to_8bit                                             # a float batch -> its exact 8-bit values k


# ---- Schedule: gamma(t) = -log SNR(t) = b + |w| s(t), s(0) = 0, s(1) = 1, s increasing (Sec. 3.2) ----------------
class Schedule(nn.Module):
    """gamma(t) with endpoints gamma_0 = b and gamma_1 = b + |w|. fixed: s(t) = t, b and w frozen; scalar: s(t) = t,
    b and w learned (the paper's b + |w| t); net: s(t) = (f(t) - f(0)) / (f(1) - f(0)) for the monotone f(t) =
    l1(t) + l3(phi(l2(l1(t)))) (positive weights, phi = sigmoid, 1024 units): exact endpoints, unlike the JAX code."""

    def __init__(self, kind, hidden=1024):
        super().__init__()
        self.kind = kind
        self.b = nn.Parameter(torch.tensor(GAMMA_MIN), requires_grad=kind != "fixed")
        self.w = nn.Parameter(torch.tensor(GAMMA_MAX - GAMMA_MIN), requires_grad=kind != "fixed")
        if kind == "net":
            self.l1, self.l2, self.l3 = nn.Linear(1, 1), nn.Linear(1, hidden), nn.Linear(hidden, 1, bias=False)
            with torch.no_grad():                                   # start near linear: l1 = identity, small l3
                self.l1.weight.fill_(1.0), self.l1.bias.zero_(), self.l3.weight.uniform_(0, 1 / hidden)

    def endpoints(self):
        return self.b, self.b + self.w.abs()

    def shape(self, t):
        """s(t): increasing, s(0) = 0 and s(1) = 1 exactly."""
        if self.kind != "net":
            return t
        u = torch.cat([t, t.new_tensor([0.0, 1.0])])[:, None]     # (B + 2, 1): t, then 0 and 1
        h = F.linear(u, self.l1.weight.abs(), self.l1.bias)       # |weights| keep f increasing
        f = (h + F.linear(torch.sigmoid(F.linear(h, self.l2.weight.abs(), self.l2.bias)), self.l3.weight.abs()))[:, 0]
        s = (f[:-2] - f[-2]) / (f[-1] - f[-2])
        return torch.where(t == 0, 0.0, torch.where(t == 1, 1.0, s))   # exact endpoints despite rounding

    def forward(self, t):
        return self.b + self.w.abs() * self.shape(t)


@torch.compiler.disable                                          # --compile: dynamo cannot trace autograd.grad
def gamma_and_slope(schedule, t, create_graph=True):
    """gamma(t), gamma'(t) by autograd (a learned schedule gets gradients through gamma' too), and the
    interior's tensors (s(t), s'(t)) that --var-min hooks. Works under no_grad (evaluation)."""
    with torch.enable_grad():
        t = t.detach().requires_grad_(True)
        s = schedule.shape(t)
        ds, = torch.autograd.grad(s.sum(), t, create_graph=create_graph)   # s_i depends on t_i only
        gamma, slope = schedule.b + schedule.w.abs() * s, schedule.w.abs() * ds
    return (gamma, slope, (s, ds)) if create_graph else (gamma.detach(), slope.detach(), (s, ds))


def alpha_sigma(gamma):
    """alpha = sqrt(sigmoid(-gamma)), sigma = sqrt(sigmoid(gamma)) (Sec. 3.2): alpha^2 + sigma^2 = 1."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


# ---- Networks: the score model eps_hat(z_t; gamma_t) and the --latent encoder/decoder ----------------------------
class _Res(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice with a skip: the block of the --latent encoder and decoder (gcd(8, ch) groups)."""

    def __init__(self, ch):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(math.gcd(8, ch), ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                  nn.GroupNorm(math.gcd(8, ch), ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class VDM(nn.Module):
    """Score network, schedule, bin centres (buffer (C, 256)) and, with --latent, encoder e = x + enc(x) and decoder
    mean u + dec(u) (last convs zero: it starts as plain VDM); forward = the bound's terms, so DDP wraps one module."""

    def __init__(self, net, schedule, centres, freqs=(), latent_ch=0):
        super().__init__()
        self.net, self.gamma, self.freqs = net, schedule, tuple(freqs)
        self.register_buffer("centres", centres)
        C, w = centres.shape[0], latent_ch

        def coder():                                                # conv, 2 residual blocks, GN, SiLU, zero conv
            out = nn.Conv2d(w, C, 3, padding=1)
            nn.init.zeros_(out.weight), nn.init.zeros_(out.bias)
            return nn.Sequential(nn.Conv2d(C, w, 3, padding=1), _Res(w), _Res(w), nn.GroupNorm(math.gcd(8, w), w),
                                 nn.SiLU(), out)
        self.encoder, self.decoder = (coder(), coder()) if latent_ch else (None, None)

    def forward(self, k, y=None, T=0, var_min=False, dtype="float32"):
        return elbo_terms(self, k, y, T, var_min=var_min, dtype=dtype)


def eps_model(model, z, gamma, y=None, w=0.0, dtype="float32"):
    """eps_hat = z_t + net([z_t, sin/cos(2^n pi z_t)], 1000 * gamma_t rescaled to [0, 1], y) (Sec. 3.4: conditioned
    on gamma, not t; a fresh model outputs z_t); only the network runs under autocast. With labels y and w != 0,
    classifier-free guidance eps = (1 + w) eps(z, c) - w eps(z, null) in one batch of 2B (w = 0: conditional model)."""
    guide = y is not None and w != 0
    if guide:
        z, gamma, y = torch.cat([z, z]), torch.cat([gamma, gamma]), torch.cat([y, torch.full_like(y, -1)])
    h = torch.cat([z] + [f(2.0 ** n * math.pi * z) for n in model.freqs for f in (torch.sin, torch.cos)], 1)
    with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        eps = z + model.net(h, 1000 * (gamma - GAMMA_MIN) / (GAMMA_MAX - GAMMA_MIN), y).float()
    return (1 + w) * eps.chunk(2)[0] - w * eps.chunk(2)[1] if guide else eps


def decoder_logits(model, u, gamma0):
    """The 256 logits of p(x | z_0) at u = z_0 / alpha_0 (--latent: at u + dec(u)), shape (*u.shape, 256): a Gaussian
    of variance exp(gamma_0) around u discretised onto the bins, -0.5 exp(-gamma_0) (u - c_k)^2."""
    u = u + model.decoder(u) if model.decoder is not None else u
    c = model.centres.view(1, model.centres.shape[0], *[1] * (u.dim() - 2), 256)
    return -0.5 * torch.exp(-gamma0) * (u[..., None] - c) ** 2


def recon_nll(model, k, u, gamma0):
    """-log p(x = k | z_0) per element: -log_softmax(decoder_logits) at the true bin, the log-sum-exp over only the bins
    within 8 std (exp(gamma_0 / 2)) of u (the rest hold < e^-32 of the mass): exact in float32, and cheap (README)."""
    chan = torch.arange(k.shape[1], device=k.device).view(1, -1, *[1] * (k.dim() - 2))
    c, step = model.centres, (model.centres[:, 1] - model.centres[:, 0]).view(chan.shape)   # uniform spacing
    W = min(255, math.ceil(8 * math.exp(min(30.0, 0.5 * gamma0.item())) / step.min().item()) + 1)  # 255: every bin
    u = u + model.decoder(u) if model.decoder is not None else u
    j0 = ((u.detach() - c[:, 0].view(chan.shape)) / step).round().clamp(0, 255).long()   # nearest bin
    j = j0[..., None] + torch.arange(-W, W + 1, device=u.device)                          # (..., 2W + 1)
    logits = -0.5 * torch.exp(-gamma0) * (u[..., None] - c[chan[..., None], j.clamp(0, 255)]) ** 2
    lse = torch.logsumexp(logits.masked_fill((j < 0) | (j > 255), -math.inf), dim=-1)
    return 0.5 * torch.exp(-gamma0) * (u - c[chan, k]) ** 2 + lse


# ---- The bound (Sec. 3.5): -log p(x) <= L_recon + L_prior + L_diff, each in bits per data dimension --------------
def diffusion_weight(gamma_t, gamma_s, T):
    """Discrete weight T (SNR(s) / SNR(t) - 1) = T expm1(gamma_t - gamma_s) of ||eps - eps_hat||^2 (Sec. 4);
    expm1 keeps the small difference exact: 1000 expm1(18.3 / 1000) = 18.47, not 18.3."""
    return T * torch.expm1(gamma_t - gamma_s)


def elbo_terms(model, k, y=None, T=0, antithetic=True, var_min=False, dtype="float32"):
    """Per-example (recon, prior, diff) in bits/dim, each (B,), for 8-bit data k (B, C, H, W) or (B, 2).
    recon: -log p(x | z_0), z_0 / alpha_0 = x + exp(gamma_0 / 2) eps, 256-way softmax over the bins.
    prior: KL(q(z_1 | x) || N(0, I)) = 0.5 sum (sigma_1^2 + alpha_1^2 x^2 - log sigma_1^2 - 1).
    diff:  T = 0 (Sec. 5): 0.5 gamma'(t) ||eps - eps_hat(z_t; gamma_t)||^2 with gamma' by autograd;
           T = N (Sec. 4): 0.5 N expm1(gamma_t - gamma_s) ||eps - eps_hat||^2 with t on {1/N..1}.
    Antithetic times: one u ~ U(0, 1) per batch, t_i = (u + i / B) mod 1."""
    B, D, dims = k.shape[0], k[0].numel(), tuple(range(1, k.dim()))
    chan = torch.arange(k.shape[1], device=k.device).view(1, -1, *[1] * (k.dim() - 2))
    x = model.centres[chan, k]                                       # bin centres, shaped like k
    e = x + model.encoder(x) if model.encoder is not None else x     # the diffused variable
    gamma0, gamma1 = model.gamma.endpoints()
    # L_recon, sampling z_0 / alpha_0 directly
    recon = recon_nll(model, k, e + torch.exp(0.5 * gamma0) * torch.randn_like(e), gamma0).sum(dims)
    # L_prior, with sigma_1^2 - 1 = -alpha_1^2 and -log sigma_1^2 = softplus(-gamma_1) for precision
    a2 = torch.sigmoid(-gamma1)
    prior = 0.5 * (a2 * e ** 2 + F.softplus(-gamma1) - a2).sum(dims)
    t = torch.rand(1 if antithetic else B, device=k.device)          # L_diff
    t = (t + torch.arange(B, device=k.device) / B) % 1 if antithetic else t
    t = (torch.floor(t * T) + 1) / T if T else t                     # discrete: uniform on {1/T, ..., 1}
    gamma_t, slope, interior = gamma_and_slope(model.gamma, t, create_graph=torch.is_grad_enabled())
    alpha_t, sigma_t = alpha_sigma(gamma_t.view(-1, *[1] * len(dims)))
    eps = torch.randn_like(e)
    mse = ((eps - eps_model(model, alpha_t * e + sigma_t * eps, gamma_t, y, dtype=dtype)) ** 2).sum(dims)
    diff = 0.5 * (diffusion_weight(gamma_t, model.gamma(t - 1 / T), T) if T else slope) * mse
    bpd = 1 / (D * math.log(2))
    if var_min and torch.is_grad_enabled():
        # Sec. 5.3: in continuous time E[L_diff] depends only on the endpoints, so the interior eta can minimise the
        # variance E[L_diff^2] instead, whose gradient E[2 L_diff dL_diff/d eta] flows only through s(t_i), s'(t_i):
        # a custom backward there scales it by 2 L_diff_i. The endpoints b, w and the network keep the ELBO gradient.
        scale = 2 * (diff * bpd).detach()
        for v in interior:
            v.register_hook(lambda g: g * scale)
    return recon * bpd, prior * bpd, diff * bpd


# ---- Sampler (Sec. 3.3): ancestral steps with p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t; t)) ---------------------
def sample_step(z_t, eps_hat, gamma_t, gamma_s, noise):
    """z_s = (alpha_s / alpha_t) (z_t - sigma_t c eps_hat) + sigma_s sqrt(c) noise, c = -expm1(gamma_s - gamma_t)
    = 1 - SNR(t) / SNR(s): the posterior q(z_s | z_t, x_hat) written with eps_hat. gamma_t, gamma_s: floats."""
    gt, gs = (torch.tensor(float(g), dtype=torch.float64) for g in (gamma_t, gamma_s))
    (alpha_t, sigma_t), (alpha_s, sigma_s), c = alpha_sigma(gt), alpha_sigma(gs), -torch.expm1(gs - gt)
    return (alpha_s / alpha_t).item() * (z_t - (sigma_t * c).item() * eps_hat) + (sigma_s * c.sqrt()).item() * noise


@torch.no_grad()
def sample(model, shape, S, y=None, w=0.0, generator=None, device="cpu", dtype="float32"):
    """S ancestral steps from z_1 ~ N(0, I) on t_i = i / S, then k = argmax of the 256 logits of p(x | z_0).
    Only the current z is kept, so memory does not grow with S. Returns k (int64, `shape`)."""
    gamma = model.gamma(torch.linspace(0, 1, S + 1, device=device)).double().cpu()   # gamma(t_i), i = 0..S
    z, t0 = torch.randn(shape, generator=generator, device=device), time.time()
    for i in range(S, 0, -1):
        eps_hat = eps_model(model, z, torch.full((shape[0],), gamma[i].item(), device=device), y, w, dtype)
        z = sample_step(z, eps_hat, gamma[i], gamma[i - 1], torch.randn(shape, generator=generator, device=device))
        data.progress(S - i + 1, S, t0, "steps")                 # a line every few seconds on long runs
    g0 = torch.tensor(gamma[0].item(), device=device)
    return decoder_logits(model, z / alpha_sigma(g0)[0], g0).argmax(-1)


# ---- The model, and sampling from it -----------------------------------------------------------------------------
def build_model(a):
    """The VDM module: UNet (images) or MLP (swirl) on Fourier-featured input, schedule and bin centres."""
    C, n = a["channels"], len(a["fourier"])
    if data.is_2d(a["data"]):
        centres = data.swirl_grid()                                               # (2, 256): (k - mean) / std
        net = MLP(in_dim=2 * (1 + 2 * n), out_dim=2, hidden=a["hidden"], layers=a["layers"])
    else:
        centres = ((2 * torch.arange(256.0) + 1) / 256 - 1).repeat(C, 1)       # (C, 256): 2 (k + 0.5) / 256 - 1
        net = data.build_unet(a, C * (1 + 2 * n), out_ch=C, num_classes=len(a["class_names"]) if a["cond"] else 0)
    return VDM(net, Schedule(a["schedule"]), centres, a["fourier"], latent_ch=a["ch"] if a["latent"] else 0)


def load(path, device="cpu"):
    """(model, cfg) from a ckpt.pt: the EMA weights in eval mode on `device`, and the run's settings."""
    return data.load_ema(path, "vdm", build_model, KEYS, ARCH + ("guidance", "labels", "sample_steps"), device)


@torch.no_grad()
def generate(model, cfg, n=64, seed=0, sample_steps=None, guidance=None, labels=None, dtype="float32", batch=500,
             info=None):
    """n samples (images in [-1, 1] or swirl points) from fixed noise (seed), S ancestral steps (sample_steps, else T,
    else 1000), unset options from cfg. A conditional model draws a row per class of `labels` (default all), n // rows
    each, with guidance w. `info` gets sampler, nfe, sec_per_100, `labels` (each sample's class) and `nrow` (or None)."""
    cfg = dict(cfg, sample_steps=sample_steps or cfg.get("sample_steps"), labels=labels or cfg.get("labels"),
               guidance=cfg["guidance"] if guidance is None else guidance)
    device = next(model.parameters()).device
    S, w = cfg["sample_steps"] or cfg["T"] or 1000, cfg["guidance"] if cfg["cond"] else 0.0
    shape = (2,) if data.is_2d(cfg["data"]) else (cfg["channels"], cfg["image_size"], cfg["image_size"])
    ys = data.grid_labels(cfg["class_names"], cfg.get("labels"), n) if cfg["cond"] else None
    n, g = len(ys) if cfg["cond"] else n, torch.Generator(device).manual_seed(seed)

    def draw(i, b, steps=S, generator=g):                        # samples i..i + b - 1 as 8-bit values
        return sample(model, (b,) + shape, steps, ys[i:i + b].to(device) if cfg["cond"] else None, w, generator,
                      device, dtype)
    draw(0, min(batch, n), 1, None)                              # untimed: one-time set-up is not sampling time
    k, sec100 = data.timed_batches(draw, n, batch)               # -> images k / 127.5 - 1, swirl (k - mean) / std
    x = model.centres.cpu()[torch.arange(2), k] if data.is_2d(cfg["data"]) else data.to_float(k.to(torch.uint8))
    if info is not None:
        info.update(sampler=f"ancestral{S}" + data.guidance_tag(cfg), nfe=S * (2 if w else 1), sec_per_100=sec100,
                    labels=ys, nrow=int((ys == ys[0]).sum()) if cfg["cond"] else None)
    return x


@torch.no_grad()
def evaluate(model, cfg, seed=0, dtype="float32", batch=200):
    """The bound averaged over the test split (one draw of t, eps per example; conditional: true labels)."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)

    def bound(x, y):                                             # per-example (recon, prior, diff) of a test batch
        y = y.to(device) if cfg["cond"] else None
        return elbo_terms(model, to_int(cfg, x.to(device)), y, cfg["T"], dtype=dtype)
    r, p, d = data.mean_over_test(cfg, bound, batch)
    return dict(test_bpd=r + p + d, test_recon=r, test_prior=p, test_diff=d)


# ---- Training: the negative ELBO in bits/dim, in one flat step loop; the run plumbing is in data.py --------------
ARCH = ("data", "image_size", "channels", "classes", "class_names", "T", "schedule", "fourier", "cond", "latent",
        "ch", "ch_mult", "num_res_blocks", "attn_res", "dropout", "temb_dim", "hidden", "layers")   # fixed by a ckpt
KEYS = ("model", "ema", "opt")                                   # the state dicts a checkpoint holds


def train(args):
    rank, world, device, ckpt, (x, y, names) = data.start_training(args, "vdm", KEYS + ("rng",), ARCH)
    ckpt_path, a = os.path.join(args.out, "ckpt.pt"), vars(args)
    a["channels"], a["class_names"] = 2 if data.is_2d(a["data"]) else x.shape[1], a.get("class_names") or names
    if a["cond"] and not a["class_names"]:
        raise ValueError(f"--cond needs labelled image data; {a['data']} has no classes")

    model = build_model(a).to(device)
    data.grid_labels(a["class_names"], a["labels"], 1) if a["cond"] else None  # reject a bad --labels now
    ema = copy.deepcopy(model).requires_grad_(False).eval()      # sampling weights; eval(): no dropout
    groups = [dict(params=[p for n, p in model.named_parameters() if not n.startswith("gamma.")]),
              dict(params=list(model.gamma.parameters()), weight_decay=0.0)]   # it would pull gamma to 0
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)   # AdamW as the paper
    step = data.resume_states(ckpt, world, ckpt_path, model=model, ema=ema, opt=opt)
    batches = data.batches(x, y, args.batch_size, args.flip, args.seed, device, start=step)
    real = data.reference(a, x, y)
    train_model = data.wrap_ddp(torch.compile(model) if args.compile else model, device)

    os.makedirs(args.out, exist_ok=True)
    log = data.Log(args.out, rank == 0, step, args.steps, args.log_every)
    flags = "".join(" " + f for f in ("var_min", "latent", "cond") if a[f])
    log(data.run_header("vdm", a, x, model, device, world, step, f"T {a['T']} {a['schedule']}{flags}"))
    sums, n_sum, avg = torch.zeros(3, dtype=torch.float64), 0, [float("nan")] * 3
    while step < args.steps:
        lr = data.set_lr(opt, data.lr_at(step, args.steps, args.lr, args.warmup, args.lr_schedule))
        x0, y0 = next(batches)
        y = torch.where(torch.rand(len(y0), device=device) < args.p_uncond, -1, y0) if a["cond"] else None  # -1: null
        terms = train_model(to_int(a, x0), y, T=a["T"], var_min=args.var_min, dtype=args.dtype)
        loss = sum(v.mean() for v in terms)                      # the negative ELBO in bits/dim
        data.optimizer_step(opt, loss, model, args.grad_clip, log, step, ckpt_path)
        step += 1
        data.ema_update(ema, model, args.ema, step)
        sums, n_sum = sums + torch.stack([v.detach().mean().double().cpu() for v in terms]), n_sum + 1
        if log.due(step):
            avg, (g0, g1) = (sums / n_sum).tolist(), (v.item() for v in model.gamma.endpoints())
            log.progress(step, f"loss {sum(avg):.4f} bpd (recon {avg[0]:.4f} prior {avg[1]:.4f} diff {avg[2]:.4f}) "
                               f"| gamma {g0:.2f}..{g1:.2f} | lr {lr:.2e}")
            sums, n_sum = torch.zeros(3, dtype=torch.float64), 0
        data.sample_grid(args, a, step, rank, log, real,
                         lambda info: generate(ema, a, args.n_samples, args.seed, dtype=args.dtype, info=info))
        if rank == 0 and (step % args.ckpt_every == 0 or step == args.steps):
            data.save_checkpoint(ckpt_path, "vdm", step, a, model=model, ema=ema, opt=opt)

    if rank == 0:
        test = evaluate(ema, a, args.seed, args.dtype)
        log(" | ".join(f"{k} {v:.4f}" for k, v in test.items()) + " (bits/dim, EMA weights, test split)")
        info = {}
        xs = generate(ema, a, args.n_samples, args.seed, dtype=args.dtype, info=info)
        data.write_outputs(a, "vdm", xs, info, args.out, log,
                           dict(step=step, loss=sum(avg), recon=avg[0], prior=avg[1], diff=avg[2], **test), real,
                           save_npz_too=args.save_npz, labels=info["labels"], nrow=info["nrow"])
    data.teardown_ddp()


def sample_only(args):
    """--sample-only (a grid, optionally an .npz) or --eval (test bits/dim) from a checkpoint; this command's flags."""
    path = args.ckpt or os.path.join(args.out, "ckpt.pt")
    model, cfg = load(path, data.pick_device(args.device))
    cfg.update(sample_steps=args.sample_steps, guidance=args.guidance, labels=args.labels, seed=args.seed,
               data_dir=args.data_dir)
    data.check_labels(cfg, args.labels)                          # fails before anything is written
    data.seed_all(args.seed)
    out = data.sample_out(args, path, DEFAULT_OUT)
    if args.eval:
        test = evaluate(model, cfg, args.seed, args.dtype)
        return data.write_eval(out, "vdm", cfg, test, f" (bits/dim, EMA weights, step {cfg['step']})")
    info, n = {}, args.n_samples or (2500 if data.is_2d(cfg["data"]) else 100)
    xs = generate(model, cfg, n, args.seed, dtype=args.dtype, info=info)
    data.write_outputs(cfg, "vdm", xs, info, out, print, dict(step=cfg["step"]), tag=info["sampler"],
                       save_npz_too=args.save_npz, labels=info["labels"], nrow=info["nrow"])


# ---- Command line ------------------------------------------------------------------------------------------------
DEFAULT_OUT = "runs/vdm"
# Training budgets that fit a laptop CPU (flags override them); the model-level defaults are the paper's (README).
_TRAIN = dict(lr=1e-3, warmup=100, lr_schedule="cosine", grad_clip=1.0, ema=0.9999)
DEFAULTS = {"data": "glyphs", "lr_note": "; the paper's 2e-4", "warmup_note": " as in the paper",
            "lr_schedule_note": "; the paper's constant",
            "image": dict(_TRAIN, steps=5000, batch_size=64, n_samples=100, sample_every=2500),
            "2d": dict(_TRAIN, steps=10000, batch_size=512, n_samples=2500, sample_every=5000)}


def get_parser():
    p = data.Parser(description="VDM (Kingma et al. 2021): bits/dim, learned gamma.", allow_abbrev=False)
    data.add_shared_args(p, DEFAULT_OUT, DEFAULTS, "glyphs | glyphs-mono | cifar10 | mnist | swirl | path to an image folder")
    d = p.add_argument_group("diffusion and sampling")
    d.add_argument("--T", type=int, default=0, help="0: continuous-time loss (Sec. 5); N: discrete on N steps")
    d.add_argument("--schedule", choices=["fixed", "scalar", "net"], default="scalar", help="gamma(t) (Sec. 3.2)")
    d.add_argument("--var-min", action=argparse.BooleanOptionalAction, default=False,
                   help="train the net schedule's interior to minimise the loss variance (Sec. 5.3)")
    d.add_argument("--latent", action=argparse.BooleanOptionalAction, default=False,
                   help="diffuse an encoder's latent (the coder is --ch wide)")
    data.add_guidance_args(d)                                    # --cond, --p-uncond, --guidance, --labels
    d.add_argument("--sample-steps", type=int, default=None, help="ancestral steps (default T, 1000 if continuous)")
    d.add_argument("--eval", action="store_true", help="only report a checkpoint's test-set bits/dim, term by term")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    checks = [(args.T < 0, "--T must be 0 (continuous time) or a number of steps >= 1"),
              (args.sample_steps is not None and args.sample_steps < 1, "--sample-steps must be at least 1"),
              (args.sample_only and args.eval, "--sample-only and --eval are separate modes: choose one"),
              (not 0 <= args.p_uncond < 1, "--p-uncond must be in [0, 1)"),
              (args.var_min and (args.schedule != "net" or args.T > 0), "--var-min needs --schedule net and "
               "continuous time (--T 0): only there is the bound independent of the schedule's interior"),
              (data.is_2d(args.data) and args.data != "swirl", f"vdm's 2-D mode needs 8-bit points: use --data "
               f"swirl, not {args.data}"),
              (args.latent and data.is_2d(args.data), "--latent needs image data (a conv encoder and decoder)"),
              (args.labels and not args.cond and not (args.sample_only or args.eval), "--labels needs --cond")]
    try:
        data.raise_first(checks)
        if not (args.sample_only or args.eval):
            data.apply_defaults(args, DEFAULTS)
            # Fourier features sin/cos(2^n pi z), n = 7, 8, resolve the 8-bit grid of images; a latent or 2-D point: none
            args.fourier = [] if args.latent or data.is_2d(args.data) else [7, 8]
        data.check_args(args)
        return sample_only(args) if args.sample_only or args.eval else train(args)
    except ValueError as e:
        data.die(f"vdm.py: error: {e}")


if __name__ == "__main__":
    main()
