"""Shortcut MCMC: Gang Chen 2023, "Speed up the inference of diffusion models via shortcut MCMC sampling" (arXiv 2301.01206).

Idea: a VDM-style diffusion model (continuous time, learnable linear gamma(t) = -log SNR(t)) is sampled through
a short chain of K times drawn from a grid of T: start at t = 1, and at each jump t -> s predict
x0_hat = (z_t - sigma_t eps_hat) / alpha_t and re-noise it, z_s = alpha_s x0_hat + sigma_s eps; the last x0_hat
is the sample (K + 1 network calls). Training adds a fidelity loss ||x0 - x0_hat||^2, back-propagated through
every network call of the chain (started from alpha_1 x0 + sigma_1 eps), to the usual VDM bound, so that the
K-step sampler lands on the data. --lambda-fid 0 is the plain VDM baseline. The paper's per-sample loss
(--fidelity l2) makes every sampler worse in our runs; the default is a variant (--fidelity energy): the energy
distance between a batch of chain samples started from N(0, I), as at sampling, and a batch of data.

Run: `python shortcut_mcmc.py --compare` (swirl: baseline vs shortcut, K=10 and all 200, ~3 min); more in README.md.

t convention: t in [0, 1] is continuous (gamma(0) least noise, gamma(1) most). The chain lives on the grid t = n / T,
n in {1..T}: from n = T it visits K distinct n of {1..T-1} (drawn afresh every training iteration), descending; --K
T-1 visits every grid time. The network sees gamma_t rescaled to [0, 1000].
Re-noising (--renoise): eps_hat is DDIM's eta = 0 step; forward reuses the chain start's noise (training: the eps
of z_1 = alpha_1 x0 + sigma_1 eps; sampling: z_1 itself); fresh draws new noise at every jump (z_s ~ q(z_s | x0_hat)).
"""
import argparse
import copy
import os
import shutil
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from unet import MLP

GAMMA_MIN, GAMMA_MAX = -13.3, 5.0                                # VDM's initial endpoints of gamma


# ----------------------------------------------------------------------------------------------------
# Schedule and model: gamma(t) = b + |w| t (VDM Sec. 3.2, learnable scalar endpoints), eps_hat(z_t; gamma_t)
def alpha_sigma(gamma):
    """alpha = sqrt(sigmoid(-gamma)), sigma = sqrt(sigmoid(gamma)): alpha^2 + sigma^2 = 1, SNR = exp(-gamma)."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


class ShortcutVDM(nn.Module):
    """The denoiser, the learnable linear schedule, and the data's box (for clipping x0_hat), bin width and edge bins
    (for the 8-bit likelihood: the values of bins 0 and 255, default the box) as buffers shaped like one example.
    forward() returns the training losses, so DDP wraps a single call however many network calls the chain makes."""

    def __init__(self, net, lo, hi, bin_width, edges=None):
        super().__init__()
        self.net = net
        self.b = nn.Parameter(torch.tensor(GAMMA_MIN))
        self.w = nn.Parameter(torch.tensor(GAMMA_MAX - GAMMA_MIN))
        for name, v in (("lo", lo), ("hi", hi), ("bin_width", bin_width)):
            self.register_buffer(name, v)
        for name, v in zip(("x_first", "x_last"), edges or (lo, hi)):   # not saved: set by build_model
            self.register_buffer(name, v, persistent=False)

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
    n = ((torch.randperm(T - 1, generator=generator)[:K] + 1).tolist() if how == "random" else
         [round(T - i * (T - 1) / K) for i in range(1, K + 1)])
    return [T] + sorted(n, reverse=True)


def run_chain(model, z, times, T, renoise, clip=True, eps_fwd=None, dtype="float32", generator=None):
    """From z at t = times[0] / T jump through `times`: x0_hat = (z_t - sigma_t eps_hat) / alpha_t, z_s = alpha_s x0_hat
    + sigma_s noise; returns the last x0_hat (len(times) network calls). The schedule is detached: a fidelity loss would
    lower gamma_1 and leak x0 into the training chain's start, which sampling from N(0, I) never has."""
    g = model.gamma(torch.tensor(times, device=z.device) / T).detach()
    alpha, sigma = alpha_sigma(g)
    eps_fwd = z if eps_fwd is None else eps_fwd                 # sampling: z_1 ~ N(0, I) is the forward noise
    t0, sampling = time.time(), not torch.is_grad_enabled()      # training's chain carries gradients
    for i in range(len(times)):
        eps_hat = model.eps_hat(z, g[i].expand(z.shape[0]), dtype)
        x0_hat = (z - sigma[i] * eps_hat) / alpha[i]
        x0_hat = x0_hat.clamp(model.lo, model.hi) if clip else x0_hat    # the data's box: the first jump divides by alpha_1 ~ 0.08
        if i + 1 == len(times):
            return x0_hat
        if sampling:                                             # --K T-1 on images: a line every few seconds
            data.progress(i + 1, len(times), t0, "steps")
        noise = ((z - alpha[i] * x0_hat) / sigma[i] if renoise == "eps_hat" else eps_fwd if renoise == "forward"
                 else torch.randn(z.shape, generator=generator, device=z.device))  # eps_hat: DDIM eta = 0, eps
        z = alpha[i + 1] * x0_hat + sigma[i + 1] * noise                           # consistent with the clipped x0_hat


@torch.no_grad()
def sample_chain(model, shape, times, T, renoise, clip=True, generator=None, device="cpu", dtype="float32"):
    """The shortcut sampler: z_1 ~ N(0, I), then the chain over `times`; NFE = len(times)."""
    z = torch.randn(shape, generator=generator, device=device)
    return run_chain(model, z, times, T, renoise, clip, None, dtype, generator)


@torch.no_grad()
def sample_ancestral(model, shape, T, clip=True, generator=None, device="cpu", dtype="float32"):
    """VDM's ancestral sampler on the grid n = T..1 (Sec. 3.3): p(z_s | z_t) = q(z_s | z_t, x0_hat), mean (alpha_s /
    alpha_t)(1 - c) z_t + alpha_s c x0_hat, variance sigma_s^2 c, c = -expm1(gamma_s - gamma_t); returns z_0 / alpha_0."""
    g = model.gamma(torch.arange(T + 1, device=device) / T).double()
    alpha, sigma = (v.float() for v in alpha_sigma(g))
    z, t0 = torch.randn(shape, generator=generator, device=device), time.time()
    for n in range(T, 0, -1):
        x0_hat = (z - sigma[n] * model.eps_hat(z, g[n].float().expand(shape[0]), dtype)) / alpha[n]
        x0_hat = x0_hat.clamp(model.lo, model.hi) if clip else x0_hat
        c = -torch.expm1(g[n - 1] - g[n]).float()
        z = alpha[n - 1] / alpha[n] * (1 - c) * z + alpha[n - 1] * c * x0_hat \
            + sigma[n - 1] * c.sqrt() * torch.randn(shape, generator=generator, device=device)
        data.progress(T - n + 1, T, t0, "steps")                 # a line every few seconds on long runs
    return (z / alpha[0]).clamp(model.lo, model.hi) if clip else z / alpha[0]


# ----------------------------------------------------------------------------------------------------
# Losses: the VDM bound (continuous time) + lambda_fid * the fidelity loss through the chain
def energy_distance(x, y):
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| between two batches flattened per example, the distances over sqrt(D) so that
    --lambda-fid weighs 2-D points and images alike (N(0, I) vs N(0.5, I): ~0.15 at D = 2, ~0.17 at large D)."""
    x, y = x.flatten(1), y.flatten(1)
    ed = 2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()
    return ed / x.shape[1] ** 0.5


def recon_nll(model, x0, e0, gamma0):
    """-log p(x0 | z_0) per element, z_0 / alpha_0 = x0 + exp(gamma_0 / 2) e0: a Gaussian of std exp(gamma_0 / 2)
    around z_0 / alpha_0 integrated over x0's 8-bit bin, bins 0 and 255 out to -inf and +inf (DDPM Eq. 13)."""
    h = (model.bin_width / (2 * torch.exp(0.5 * gamma0))).double()   # half a bin in units of the decoder's std
    e0, half = e0.double(), model.bin_width / 2
    upper = torch.where(x0 > model.x_last - half, torch.inf, h - e0)     # bin 255 reaches +inf,
    lower = torch.where(x0 < model.x_first + half, -torch.inf, -h - e0)  # bin 0 reaches -inf
    return -torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))   # float64


def losses(model, x0, cfg, use_fid):
    """Per-dimension (nats) terms (diff, prior, recon, fid) for a batch x0 (B, ...) in the data's units.
    diff:  VDM's continuous L_diff: 0.5 gamma'(t) ||eps - eps_hat(z_t; gamma_t)||^2, antithetic t, gamma' = |w|.
    prior: KL(q(z_1 | x) || N(0, I)) = 0.5 (sigma_1^2 + alpha_1^2 x^2 - log sigma_1^2 - 1).
    recon: -log p(x | z_0) (recon_nll): the decoder's Gaussian integrated over x's 8-bit bin (DDPM Eq. 13).
    fid:   the paper's fidelity loss ||x0 - x0_hat||^2 of the K-step chain started at alpha_1 x0 + sigma_1 eps
           (--fidelity l2), or the variant: energy distance between chain outputs from N(0, I) and the batch,
           per dimension (energy_distance), like the per-dimension means of the other terms."""
    B, view = x0.shape[0], (-1,) + (1,) * (x0.dim() - 1)
    g0, g1 = model.gamma(x0.new_zeros(())), model.gamma(x0.new_ones(()))
    t = (torch.rand(1, device=x0.device) + torch.arange(B, device=x0.device) / B) % 1
    gamma_t = model.gamma(t)
    alpha_t, sigma_t = alpha_sigma(gamma_t.view(view))
    eps = torch.randn_like(x0)
    diff = 0.5 * model.w.abs() * ((eps - model.eps_hat(alpha_t * x0 + sigma_t * eps, gamma_t, cfg["dtype"])) ** 2).mean()
    a2 = torch.sigmoid(-g1)
    prior = 0.5 * (a2 * x0 ** 2 - a2 + F.softplus(-g1)).mean()  # sigma_1^2 - 1 = -alpha_1^2, -log sigma_1^2 = softplus(-g1)
    recon = recon_nll(model, x0, torch.randn_like(x0), g0).mean().float()
    fid = x0.new_zeros(())
    if use_fid:
        times = chain_times(cfg["T"], cfg["K"], "random")       # fresh times every iteration (the public code draws them once)
        xb, l2 = x0[:cfg["fid_batch"]], cfg["fidelity"] == "l2"
        a1, s1 = alpha_sigma(g1.detach())
        e1 = torch.randn_like(xb)
        z1 = a1 * xb + s1 * e1 if l2 else e1                    # l2: from the batch; energy: from N(0, I), as at sampling
        x0_hat = run_chain(model, z1, times, cfg["T"], cfg["renoise"], cfg["clip"], e1, cfg["dtype"])
        fid = ((xb - x0_hat) ** 2).mean() if l2 else energy_distance(x0_hat, xb)
    return diff, prior, recon, fid


# ----------------------------------------------------------------------------------------------------
# The model, and sampling from it
def build_model(a):
    """MLP for swirl, the shared UNet for images; box and bin width: swirl's per-axis range and 1 / std of its
    8-bit steps, images [-1, 1] and 2 / 255."""
    if data.is_2d(a["data"]):
        net = MLP(in_dim=2, hidden=a["hidden"], layers=a["layers"])
        lo, hi, bw = torch.tensor(a["box"][0]), torch.tensor(a["box"][1]), 1 / data.swirl_scale()[1]
        edges = tuple(data.swirl_grid()[:, [0, 255]].T.contiguous())  # the values of 8-bit 0 and 255 per axis
    else:
        net = data.build_unet(a, a["channels"])
        lo, hi, bw = torch.tensor(-1.0), torch.tensor(1.0), torch.tensor(2 / 255)
        edges = (lo, hi)
    return ShortcutVDM(net, lo.float(), hi.float(), bw.float(), tuple(v.float() for v in edges))


def sampler_name(cfg):
    """The sampler in words, e.g. chain10_random_eps_hat or ancestral200 (file names and metrics.json)."""
    return f"ancestral{cfg['T']}" if cfg["times"] == "ancestral" else f"chain{cfg['K']}_{cfg['times']}_{cfg['renoise']}"


def load(path, device="cpu"):
    """(model, cfg) from a ckpt.pt: the EMA weights in eval mode on `device`, and the run's settings."""
    return data.load_ema(path, "shortcut_mcmc", build_model, ("ema",), ARCH + ("K", "times", "renoise", "clip_x0"), device)


@torch.no_grad()
def generate(model, cfg, n=64, seed=0, times=None, K=None, renoise=None, clip_x0=None, subset=0, dtype="float32",
             batch=1024, info=None):
    """n samples from fixed noise (seed), in batches: the chain over K random (from (seed, subset)) or even times,
    or VDM's ancestral sampler on all T; unset options come from cfg. `info` (a dict) receives the sampler's name,
    NFE and seconds per 100 samples, timed after one untimed network call (set-up is not sampling time)."""
    cfg = {**cfg, **{k: v for k, v in dict(times=times, K=K, renoise=renoise, clip_x0=clip_x0).items() if v is not None}}
    device, T, how = next(model.parameters()).device, cfg["T"], cfg["times"]
    shape = (2,) if data.is_2d(cfg["data"]) else (cfg["channels"], cfg["image_size"], cfg["image_size"])
    chain = None if how == "ancestral" else chain_times(T, cfg["K"], how, torch.Generator().manual_seed(1000 * seed + subset))
    model.eps_hat(torch.zeros((min(batch, n),) + shape, device=device), torch.zeros(min(batch, n), device=device), dtype)
    g, t0, out = torch.Generator(device).manual_seed(seed), time.time(), []
    for b in [(min(batch, n - i),) + shape for i in range(0, n, batch)]:
        out.append((sample_chain(model, b, chain, T, cfg["renoise"], cfg["clip_x0"], g, device, dtype) if chain else
                    sample_ancestral(model, b, T, cfg["clip_x0"], g, device, dtype)).cpu())
        data.progress(sum(map(len, out)), n, t0, "samples")
    if info is not None:
        info.update(sampler=sampler_name(cfg), nfe=len(chain) if chain else T, sec_per_100=100 * (time.time() - t0) / n)
    return torch.cat(out)


def evaluate(model, cfg, n=None, times=None, K=None, renoise=None, clip_x0=None, dtype="float32"):
    """Sample and score over cfg's eval_seeds noise seeds (x subsets time subsets for a random chain; images: the
    first run only, the classifier is slow). Returns (the first run's samples, generate()'s info + pooled scores)."""
    how, info = times or cfg["times"], {}
    runs = [(s, j) for s in range(cfg["eval_seeds"]) for j in range(cfg["subsets"] if how == "random" else 1)]
    xs = [generate(model, cfg, n or cfg["n_samples"], cfg["seed"] + s, how, K, renoise, clip_x0, j, dtype,
                   info=None if info else info) for s, j in (runs if data.is_2d(cfg["data"]) else runs[:1])]
    return xs[0], dict(info, scores=data.pool_scores([data.score(cfg, x) for x in xs]))


# ----------------------------------------------------------------------------------------------------
# Training: the VDM bound + lambda_fid * fidelity, in one flat step loop; the run plumbing is in data.py
ARCH = ("data", "image_size", "channels", "classes", "box", "T", "ch", "ch_mult", "num_res_blocks", "attn_res",
        "dropout", "temb_dim", "hidden", "layers")   # what a checkpoint fixes
KEYS = ("model", "ema", "opt", "rng")                            # what a checkpoint must hold to resume


def train(args, until=None):
    """Train to --steps (or stop at step `until`, checkpointed, for --compare's shared warm-up)."""
    rank, world, device, ckpt, (x, y, _) = data.start_training(args, "shortcut_mcmc", KEYS, ARCH)
    ckpt_path, a = os.path.join(args.out, "ckpt.pt"), vars(args)
    a["channels"] = 2 if data.is_2d(a["data"]) else x.shape[1]
    if data.is_2d(a["data"]) and not a.get("box"):               # swirl's box: the training range, 5% margin
        a["box"] = data.points_box(x, 0.05)

    # model, optimizer (AdamW as VDM; no weight decay on the schedule), EMA
    model = build_model(a).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()     # sampling weights; eval(): no dropout
    groups = [dict(params=list(model.net.parameters())), dict(params=[model.b, model.w], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    step = data.resume_states(ckpt, world, ckpt_path, model=model, ema=ema, opt=opt)   # every RNG: the chain's times too
    batches = data.batches(x, y, args.batch_size, args.flip, args.seed, device, start=step)
    real = data.reference(a, x, y)
    train_model = data.wrap_ddp(torch.compile(model) if args.compile else model, device)
    cfg = dict(a, clip=args.clip_x0)                             # what losses() reads: T, K, renoise, fidelity, ...

    os.makedirs(args.out, exist_ok=True)
    log = data.Log(args.out, rank == 0, step, args.steps, args.log_every)
    log(data.run_header("shortcut_mcmc", a, x, model, device, world, step, f"T {args.T} K {args.K} renoise {args.renoise} "
                        f"| lambda_fid {args.lambda_fid} ({args.fidelity}) from step {args.fid_start} every {args.fid_every}"))
    sums, n_sum, avg = torch.zeros(4, dtype=torch.float64), 0, [float("nan")] * 4
    stop = args.steps if until is None else min(until, args.steps)
    while step < stop:
        lr = data.set_lr(opt, data.lr_at(step, args.steps, args.lr, args.warmup, args.lr_schedule))
        x0, _ = next(batches)
        use_fid = args.lambda_fid > 0 and step >= args.fid_start and (step - args.fid_start) % args.fid_every == 0
        terms = train_model(x0, cfg, use_fid)
        loss = terms[0] + terms[1] + terms[2] + args.lambda_fid * terms[3]
        data.optimizer_step(opt, loss, model, args.grad_clip, log, step, ckpt_path)   # a diverged step is never saved
        step += 1
        data.ema_update(ema, model, args.ema, step)
        sums, n_sum = sums + torch.stack([v.detach().double().cpu() for v in terms]), n_sum + 1
        if log.due(step) or step == stop:
            avg, g0, g1 = (sums / n_sum).tolist(), model.b.item(), model.b.item() + model.w.abs().item()
            log.progress(step, f"loss {sum(avg[:3]):.4f} nats/dim (diff {avg[0]:.4f} prior {avg[1]:.4f} recon "
                         f"{avg[2]:.4f}) | fid {avg[3]:.4f} | gamma {g0:.2f}..{g1:.2f} | lr {lr:.2e}")
            sums, n_sum = torch.zeros(4, dtype=torch.float64), 0
        data.sample_grid(args, a, step, rank, log, real, lambda _: generate(ema, a, args.n_samples, args.seed, dtype=args.dtype))
        if rank == 0 and (step % args.ckpt_every == 0 or step == stop):
            data.save_checkpoint(ckpt_path, "shortcut_mcmc", step, a, model=model, ema=ema, opt=opt)

    if rank == 0 and step == args.steps:                         # not after --compare's warm-up (checkpointed)
        xs, info = evaluate(ema, a, dtype=args.dtype)
        data.write_outputs(a, "shortcut_mcmc", xs, info, args.out, log, dict(step=step, loss=sum(avg[:3]),
                           diff=avg[0], prior=avg[1], recon=avg[2], fid=avg[3]), real, save_npz_too=args.save_npz)
    data.teardown_ddp()


def sample_only(args):
    """--sample-only: load() and evaluate() a checkpoint's EMA weights, without the training flags."""
    path = args.ckpt or os.path.join(args.out, "ckpt.pt")
    model, cfg = load(path, data.pick_device(args.device))
    cfg.update(seed=args.seed, subsets=args.subsets, eval_seeds=args.eval_seeds)
    torch.set_flush_denormal(True)                               # as in training: denormals make CPU steps slow
    n = args.n_samples or (1024 if data.is_2d(cfg["data"]) else 100)
    xs, info = evaluate(model, cfg, n, args.times, args.K, args.renoise, args.clip_x0, args.dtype)
    data.write_outputs(cfg, "shortcut_mcmc", xs, info, data.sample_out(args, path, DEFAULT_OUT), print,
                       dict(step=cfg["step"]), tag=info["sampler"], save_npz_too=args.save_npz)


def compare(args):
    """The shortcut model against its VDM baseline: the baseline (lambda_fid 0) and the shortcut model share the
    diffusion-only warm-up (--fid-start steps, same seed), then each trains to --steps, with and without the fidelity
    loss; both are sampled with K random times (subsets x seeds), K evenly spaced ones, all T grid times and VDM's
    ancestral."""
    if "RANK" in os.environ:
        raise ValueError("--compare trains two models one after the other in one process: run it without torchrun")
    outs = {m: os.path.join(args.out, m) for m in ("baseline", "shortcut")}
    if any(os.path.exists(os.path.join(o, "ckpt.pt")) for o in outs.values()):
        raise ValueError(f"{args.out} holds a --compare run already: choose another --out")
    train(argparse.Namespace(**dict(vars(args), lambda_fid=0.0, out=outs["baseline"])), until=args.fid_start)
    shutil.copytree(outs["baseline"], outs["shortcut"], dirs_exist_ok=True)      # the shared warm-up, checkpointed
    K, T, r0, two_d = args.K, args.T, args.renoise, data.is_2d(args.data)      # rows: (label, times, K, renoise)
    rows = [(f"K={K} random, {r}", "random", K, r) for r in dict.fromkeys([r0, "eps_hat", "forward", "fresh"])]
    rows += [(f"K={K} even, {r0}", "even", K, r0), (f"all {T} grid times, {r0}", "even", T - 1, r0),
             (f"ancestral {T}", "ancestral", None, r0)]
    results, pics = {}, {}
    for name, lam in (("baseline", 0.0), ("shortcut", args.lambda_fid)):
        train(argparse.Namespace(**dict(vars(args), lambda_fid=lam, out=outs[name], resume=True)))
        ema, cfg = load(os.path.join(outs[name], "ckpt.pt"), data.pick_device(args.device))
        for label, how, k, r in rows:
            pics[name, label], info = evaluate(ema, cfg, times=how, K=k, renoise=r, dtype=args.dtype)
            results[f"{name} | {label}"] = dict(nfe=info["nfe"], sec_per_100=round(info["sec_per_100"], 4), **info["scores"])
    data.write_compare(args.out, f"\nshortcut MCMC vs baseline | {args.data} | T {T} | {args.steps} steps each, fidelity "
                       f"from step {args.fid_start} | renoise {r0} | lambda_fid {args.lambda_fid} ({args.fidelity})",
                       results, two_d)
    path = os.path.join(args.out, "compare.png")
    if two_d:
        data.save_scatter([pics[m, rows[i][0]] for i in (0, -2) for m in ("baseline", "shortcut")], path, args.data,
                          real=data.reference(cfg, None, None),
                          titles=[f"baseline K={K}", f"shortcut K={K}", f"baseline all {T}", f"shortcut all {T}"])
    else:
        data.save_side_by_side(pics["baseline", rows[0][0]], pics["shortcut", rows[0][0]], path)
    print(f"picture: {path} (baseline | shortcut at K={K}" + (f"; then at all {T} grid times)" if two_d else ")"))
    return results


# ----------------------------------------------------------------------------------------------------
# Command line
DEFAULT_OUT = "runs/shortcut_mcmc"
# Training budgets that fit a laptop CPU (flags override them). The model-level defaults are the paper's:
# T = 200, K = 10, VDM's learnable linear gamma from -13.3 to 5.0, AdamW betas (0.9, 0.99), weight decay 0.01.
BOTH = dict(lr=1e-3, warmup=100, lr_schedule="cosine", grad_clip=1.0, ema=0.999, clip_x0=True, renoise="eps_hat")
DEFAULTS = {"data": "swirl",
            "image": dict(BOTH, steps=3000, batch_size=64, n_samples=100, sample_every=1500, fid_start=1500, fid_batch=16),
            "2d": dict(BOTH, steps=4000, batch_size=512, n_samples=1024, sample_every=0, fid_start=3000, fid_batch=128)}


def get_parser():
    p = data.Parser(description="Shortcut MCMC (Chen 2023): VDM sampled in K steps.", allow_abbrev=False)
    data.add_shared_args(p, DEFAULT_OUT, DEFAULTS, "swirl | glyphs | glyphs-mono | cifar10 | mnist | path to an image folder")
    c = p.add_argument_group("diffusion and the chain")
    c.add_argument("--T", type=int, default=200, help="grid of chain times t = n / T")
    c.add_argument("--K", type=int, default=10, help="chain steps after t = 1 (K + 1 network calls), 1..T-1")
    c.add_argument("--renoise", choices=["forward", "eps_hat", "fresh"], default=None, help="re-noise x0_hat with the "
                   "chain start's noise, DDIM's eps_hat, or new noise (default eps_hat; the checkpoint's when sampling)")
    c.add_argument("--times", choices=["random", "even", "ancestral"], default="random", help="K random or even times, or all T")
    c.add_argument("--subsets", type=int, default=5, help="random time subsets scored per noise seed")
    c.add_argument("--eval-seeds", type=int, default=3, help="noise seeds scored in the final evaluation")
    c.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None, help="clip x0_hat to the data's box")
    f = p.add_argument_group("fidelity loss")
    f.add_argument("--lambda-fid", type=float, default=1.0, help="weight of the fidelity loss (0: the VDM baseline)")
    f.add_argument("--fidelity", choices=["l2", "energy"], default="energy", help="l2: the paper's ||x0 - x0_hat||^2 "
                   "from alpha_1 x0 + sigma_1 eps; energy (variant): energy distance of chain samples to the batch")
    f.add_argument("--fid-start", type=int, default=None, help="diffusion-only warm-up steps (default: 1500 images, 3000 2-D)")
    f.add_argument("--fid-every", type=int, default=1, help="add the fidelity loss every this many steps")
    f.add_argument("--fid-batch", type=int, default=None, help="examples run through the chain (default: 16 images, 128 2-D)")
    f.add_argument("--compare", action="store_true", help="train the baseline and the shortcut model, print the table")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    checks = [(args.T < 2, "--T must be at least 2"),
              (not args.sample_only and not 1 <= args.K <= args.T - 1, f"--K must be between 1 and T-1 = {args.T - 1}"),
              (args.lambda_fid < 0, "--lambda-fid must be >= 0"),
              (args.fid_every < 1, "--fid-every must be at least 1"),
              ((args.fid_start or 0) < 0, "--fid-start must be >= 0"),
              (args.fid_batch is not None and args.fid_batch < 1, "--fid-batch must be at least 1"),
              (min(args.subsets, args.eval_seeds) < 1, "--subsets and --eval-seeds must be at least 1"),
              (args.compare and (args.sample_only or args.resume), "--compare trains from scratch: drop --sample-only/--resume"),
              (data.is_2d(args.data) and args.data != "swirl", f"shortcut_mcmc's 2-D mode needs the 8-bit swirl "
               f"(its likelihood term needs the bin width): use --data swirl, not {args.data}")]
    try:
        data.raise_first(checks)
        if not args.sample_only:
            data.apply_defaults(args, DEFAULTS)
            args.box = None
        data.check_args(args)
        return sample_only(args) if args.sample_only else compare(args) if args.compare else train(args)
    except ValueError as e:
        data.die(f"shortcut_mcmc.py: error: {e}")


if __name__ == "__main__":
    main()
