"""The generative learning trilemma, measured: DDPM, VDM, DDGAN and shortcut MCMC on the same data.

Xiao, Kreis & Vahdat (2022, arXiv 2112.07804) name three things a generative model should give at once: high
sample quality, mode coverage and fast sampling. This script trains every method with the same budget (the
same training steps on the same data, through each script's own command line), or reuses their checkpoints,
then samples each method's sampler(s) in one run on one device and scores all samples the same way:

  sampler       DDPM: Algorithm 2 over T = 1000 steps and DDIM on 50; VDM: ancestral, 1000 steps; DDGAN: its T
                steps (4); shortcut MCMC: K = 10 jumps (K + 1 network calls)
  speed         network evaluations per sample (NFE) and wall seconds per 100 samples, from each method's metrics
  quality       25gaussians: % high-quality samples (within 3 std of a mean) and energy distance; swirl: energy
                distance; images: Frechet distance to the real test images in the penultimate features of a
                small classifier trained on the real training images (data.features, data.frechet), and % legible
  coverage      25gaussians: modes covered of 25, KL of the mode histogram from uniform; labelled images: classes
                covered and KL of the predicted-class histogram from the real one (Stacked MNIST: 1000 modes)

A "real data" row scores n real samples the same way (training images against the same test images; fresh 2-D
points): the Frechet or energy floor, and the legibility and coverage a perfect sampler reaches with n samples.
Training budget: the same number of steps for every method (a DDGAN step is one D and one G update).

Run:   python trilemma.py --quick                         # glyphs-mono, all four methods, < 30 min on 2 cores
       python trilemma.py --quick --data 25gaussians      # DDPM and DDGAN (VDM and shortcut need 8-bit data)
       python trilemma.py --data cifar10 --classes airplane --data-dir ../shared/data --device cuda
       python trilemma.py --reuse                         # sample and score the existing checkpoints again
       python trilemma.py --sweep ddpm-T                  # the report's DDPM sweep: T, schedule, DDIM (see SWEEPS)
       python trilemma.py --sweep vdm-T                   # VDM discrete at T = 10, 100, 1000 and continuous
       python trilemma.py --sweep ddpm-report --data cifar10 --classes airplane --data-dir ../shared/data --steps N
                                                          # the report's set-up: T = 1000 (and DDIM 50), T = 2000

Writes to --out (default runs/trilemma): <method>/ (each script's own run folder: ckpt.pt, log.txt, ...),
<method>/eval_<sampler>/ (the --sample-only run: .npz, metrics), table.md, results.json and trilemma.png.
--sweep NAME writes to runs/NAME: a folder per model, named after its training flags (e.g. T-20), table.md (a row
per setting, with the peak memory of sampling and the steps trained), results.json and sweep.png (a row of samples
per setting).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import data

HERE = os.path.dirname(os.path.abspath(__file__))
# method -> (script, samplers: (short name, extra --sample-only flags)). Each script's own defaults set T (DDPM 1000,
# DDGAN 4, shortcut 200); the flags below only choose the sampler.
METHODS = {
    "ddpm": ("ddpm.py", [("T1000", []), ("ddim50", ["--sample-steps", "50"])]),
    "vdm": ("vdm.py", [("ancestral1000", ["--sample-steps", "1000"])]),
    "ddgan": ("ddgan.py", [("T", [])]),
    "shortcut": ("shortcut_mcmc.py", [("K10", ["--K", "10"])]),
}
# The training budget, the same for every method (steps; each method keeps its own batch size, lr and model
# defaults unless the flags below set them), and the number of samples each sampler draws for the scores.
SETTINGS = {
    "quick": {"image": dict(steps=1000, n_samples=200), "2d": dict(steps=10000, n_samples=2500)},
    "full": {"image": dict(steps=20000, n_samples=5000), "2d": dict(steps=20000, n_samples=10000)},
}
SWEEP_SAMPLES = 100                                             # samples per --sweep row (as the README rows)
PASS = ("batch_size", "ch", "ch_mult", "num_res_blocks", "hidden", "layers")   # model flags handed to every script
# Training flags that follow the budget: shortcut MCMC adds its fidelity loss after a diffusion-only warm-up, half
# of its default budget (1500 of 3000 image steps), so it keeps that proportion of any budget.
TRAIN_EXTRA = {"shortcut": lambda steps: ["--fid-start", str(steps // 2)]}


# The report's sweeps (--sweep NAME): one model per setting, each trained with its script's own defaults (budget,
# network, lr), sampled and scored like the table's rows. A row: (label, script, training flags, --sample-only
# flags); the rows that share a script and training flags read one model, in OUT/<training flags>/.
REPORT_UNET = ["--ch", "64", "--ch-mult", "1", "2", "4", "--temb-dim", "32"]
SWEEPS = {
    "ddpm-T": [(f"linear T={T}", "ddpm.py", ["--schedule", "linear", "--T", str(T)], []) for T in (20, 100)]
    + [(f"vp T={T}", "ddpm.py", ["--T", str(T)], []) for T in (20, 50, 100, 500, 1000, 2000)]
    + [(f"vp T=1000, DDIM S={S}", "ddpm.py", ["--T", "1000"], ["--sample-steps", str(S)]) for S in (20, 50, 100)],
    "vdm-T": [(f"discrete T={T}", "vdm.py", ["--T", str(T)], []) for T in (10, 100, 1000)]
    + [("continuous, sampled on 1000 steps", "vdm.py", [], [])],
    # the report's own DDPM set-up (UNet 64/128/256, time embedding 32, T = 1000 and 2000), for CIFAR-10 airplanes
    "ddpm-report": [(f"report UNet, T=1000{', DDIM S=50' if extra else ''}", "ddpm.py", REPORT_UNET + ["--T", "1000"],
                     extra) for extra in ([], ["--sample-steps", "50"])]
    + [("report UNet, T=2000", "ddpm.py", REPORT_UNET + ["--T", "2000"], [])],     # the report ran out of memory here
}


# ----------------------------------------------------------------------------------------------------
# Running the method scripts
def device(name):
    """The device --device auto resolves to in every script: CUDA, then Apple mps, then the CPU."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def run(cmd, prefix):
    """Run one command line, echo its output with a prefix; return (exit code, its last non-empty line)."""
    print(f"{prefix} $ {' '.join(cmd[1:])}", flush=True)
    last = ""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as p:
        for line in p.stdout:
            print(f"{prefix} {line.rstrip()}", flush=True)
            last = line.strip() or last
    return p.returncode, last


def method_flags(a):
    """The flags every script gets: data, budget, model overrides, runtime."""
    flags = ["--data", a.data, "--data-dir", a.data_dir, "--image-size", a.image_size, "--seed", a.seed,
             "--device", a.device]
    if a.classes:
        flags += ["--classes", *a.classes]
    for k in PASS:
        v = getattr(a, k)
        if v is not None:
            flags += [f"--{k.replace('_', '-')}", *(v if isinstance(v, list) else [v])]
    return [str(f) for f in flags]


def train(a, name, script, out, flags):
    """Train `script` into out/ with the shared flags and `flags` (or reuse out/ckpt.pt); returns None or why it
    failed."""
    ckpt = os.path.join(out, "ckpt.pt")
    if os.path.exists(ckpt):                                     # main() made sure --reuse was given
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        why = reuse_mismatch(a, script, flags, saved)
        if why:
            return f"not reused: {ckpt} {why}"
        print(f"[{name}] reusing {ckpt} (step {saved['step']})", flush=True)
        return None
    # --sample-every 0 and 4 end-of-training samples: the samples that are scored come from sample_one()
    cmd = [sys.executable, os.path.join(HERE, script), *method_flags(a), "--sample-every", "0",
           "--n-samples", str(min(4, a.n_samples)), "--out", out, *flags]
    t0 = time.time()
    code, last = run(cmd, f"[{name}]")
    print(f"[{name}] training took {time.time() - t0:.0f} s", flush=True)
    if code == 2:                                                # an argparse error: the script refuses this data
        return f"not run: {last}"
    return None if code == 0 else f"training failed (exit {code}): {last}"


def flag_values(flags):
    """["--ch-mult", "1", "2", "--T", "5"] -> {"ch-mult": ["1", "2"], "T": ["5"]}."""
    out = {}
    for f in flags:
        if f.startswith("--"):
            out[f[2:]] = []
        else:
            out[next(reversed(out))].append(f)
    return out


def reuse_mismatch(a, script, flags, saved):
    """Why a saved checkpoint is not the model these flags would train, or None: another script, other data, a
    flag's value that differs (flags as "--name value(s)"), or a run that stopped before its last step."""
    args = saved["args"]
    if saved.get("method") != script[:-3]:
        return f"is a {saved.get('method')} checkpoint, not {script}'s"
    differ = [k for k in ("data", "image_size", "classes") if args.get(k) != getattr(a, k)]
    differ += [name for name, values in flag_values(flags).items()
               if [str(v) for v in np.atleast_1d(args.get(name.replace("-", "_")))] != values]
    if differ:                                                   # the samples would not be this row's model
        return f"has other {', '.join(differ)} than asked for"
    if saved["step"] != args.get("steps"):
        return f"stopped at step {saved['step']} of {args.get('steps')}: finish it with --resume, or delete it"
    return None


def sample_one(a, name, script, out, tag, extra):
    """One --sample-only run of out/ckpt.pt with --save-npz into out/eval_<tag>/; returns (samples, metrics dict)
    or why it failed."""
    folder = os.path.join(out, f"eval_{tag}")
    shutil.rmtree(folder, ignore_errors=True)                    # only this sampler's fresh files are read below
    cmd = [sys.executable, os.path.join(HERE, script), "--sample-only", "--ckpt", os.path.join(out, "ckpt.pt"),
           "--out", folder, "--n-samples", str(a.n_samples), "--save-npz", "--seed", str(a.seed),
           "--device", a.device, "--data-dir", a.data_dir, *extra]
    code, last = run(cmd, f"[{name} {tag}]")
    files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    npz = [f for f in files if f.startswith("samples_") and f.endswith(".npz")]
    js = [f for f in files if f.startswith("metrics") and f.endswith(".json")]
    if code != 0 or len(npz) != 1 or len(js) != 1:
        return f"{name} {tag}: sampling failed (exit {code}): {last}"
    with open(os.path.join(folder, js[0])) as f:
        metrics = json.load(f)
    x = torch.from_numpy(np.load(os.path.join(folder, npz[0]))["arr_0"])
    if x.dtype == torch.uint8:                                   # images: uint8 NHWC -> float NCHW in [-1, 1]
        x = data.to_float(x.permute(0, 3, 1, 2))
    return x.float(), metrics


def sample(a, method, out):
    """Each of the method's samplers from out/ckpt.pt: a list of (sampler tag, samples, metrics) and of failures."""
    script, samplers = METHODS[method]
    rows, failed = [], []
    for tag, extra in samplers:
        got = sample_one(a, method, script, out, tag, extra)
        if isinstance(got, str):
            failed.append(got)
        else:
            rows.append((tag, *got))
    return rows, failed


# ----------------------------------------------------------------------------------------------------
# Scores: every sampler and the real data through the same functions
def reference(a, n):
    """What every sample set is compared with: real test points/images (+ their classifier features for images)
    and the real-data row's scores (n real points or training images scored like samples)."""
    if data.is_2d(a.data):                                       # n fresh real points (swirl has only 1024)
        real = data.load(a.data, "train", seed=a.seed + 1)[0][:n]
        return dict(real=real, row=score(a, real, None))
    x_test = data.to_float(data.load(a.data, "test", a.image_size, a.data_dir, a.classes, a.seed)[0])
    x_train = data.load(a.data, "train", a.image_size, a.data_dir, a.classes, a.seed)[0]
    pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(a.seed))[:n]
    # features from the classifier of all classes (classes=None): also meaningful for a one-class subset
    ref = dict(feat_test=data.features(x_test, a.data, a.image_size, a.data_dir), real=data.to_float(x_train[pick]))
    ref["row"] = score(a, ref["real"], ref)
    return ref


def score(a, x, ref):
    """Quality and coverage of samples x (2-D points, or images in [-1, 1]) as a dict of numbers."""
    if data.is_2d(a.data):
        return data.score_2d(x, a.data, seed=a.seed)
    fd = data.frechet(data.features(x, a.data, a.image_size, a.data_dir), ref["feat_test"])
    return dict(fd=fd, **data.score_images(x, a.data, a.image_size, a.data_dir, a.classes))


def cells(a, s, real=False):
    """The table's quality and coverage cells for one row's scores."""
    if a.data == "25gaussians":
        energy = f"energy {s['energy_floor']:.4f} (floor)" if real else f"energy {s['energy']:.4f}"
        return f"hq {s['hq']:.1f}%, {energy}", f"{s['modes']}/25 modes, KL {s['kl']:.3f}"
    if data.is_2d(a.data):
        return (f"energy {s['energy_floor']:.4f} (floor)" if real else f"energy {s['energy']:.4f}"), "-"
    quality = f"FD {s['fd']:.2f}" + (" (floor)" if real else "")
    if "legible" not in s:                                       # one class (e.g. CIFAR-10 airplanes)
        return quality, "n/a (one class)"
    k = len(data.load(a.data, "train", a.image_size, a.data_dir, a.classes, a.seed)[2])
    what = "modes" if a.data == "stackedmnist" else "classes"
    return f"{quality}, legible {s['legible']:.0f}%", f"{s['classes_covered']}/{k} {what}, KL {s['kl_classes']:.3f}"


# ----------------------------------------------------------------------------------------------------
# Output: the table and one picture
def commit():
    """The code's git commit, for the tables' first line ("unknown" outside a git checkout)."""
    try:
        git = ["git", "-C", HERE]
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        if subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                          text=True).stdout.strip():
            head += " + uncommitted changes"
        return head or "unknown"
    except OSError:
        return "unknown"


def table(a, rows, ref, notes):
    """The markdown table (method, sampler, NFE, s/100, quality, coverage) with a header naming the run."""
    what = f"{a.data}" + (f" ({', '.join(a.classes)})" if a.classes else "") + \
        ("" if data.is_2d(a.data) else f" {a.image_size}x{a.image_size}")
    lines = [f"`python trilemma.py {' '.join(a.argv)}` at commit `{commit()}`: {what}, {a.steps} training steps "
             f"per method, {a.n_samples} samples per sampler, device {device(a.device)}.", "",
             "| method | sampler | NFE | s / 100 samples | quality | coverage |", "|---|---|---|---|---|---|"]
    for method, _, m, s in rows:
        quality, coverage = cells(a, s)
        lines.append(f"| {method} | {m['sampler']} | {m['nfe']} | {m['sec_per_100']:.3g} | {quality} | {coverage} |")
    quality, coverage = cells(a, ref["row"], real=True)
    lines.append(f"| real data | {'fresh points' if data.is_2d(a.data) else 'train vs test'} | - | - | "
                 f"{quality} | {coverage} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def picture(a, rows, ref, path):
    """One PNG: a scatter (2-D) or a 6 x 6 sample grid (images) per sampler side by side, real data first."""
    titles = ["real"] + [f"{method} {m['sampler']} (NFE {m['nfe']})" for method, _, m, _ in rows]
    sets = [ref["real"]] + [x for _, x, _, _ in rows]
    if data.is_2d(a.data):
        return data.save_scatter(sets, path, a.data, real=ref["real"], titles=titles)   # real points in grey
    panels = []
    for k, x in enumerate(sets):
        tmp = f"{path}.{k}.panel.png"
        data.save_grid(x[:36], tmp, nrow=6)
        panels.append(Image.open(tmp).convert("RGB"))
        os.remove(tmp)
    gap, top = 10, 20
    canvas = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), top + panels[0].height),
                       (255, 255, 255))
    draw, font, left = ImageDraw.Draw(canvas), ImageFont.load_default(size=13), 0
    for p, title in zip(panels, titles):
        canvas.paste(p, (left, top))
        draw.text((left + 2, 3), title, fill=(0, 0, 0), font=font)
        left += p.width + gap
    canvas.save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------------
# --sweep: a row per setting of one method
def flags_name(flags):
    """A folder name for a list of flags: ["--T", "20"] -> "T-20", [] -> "defaults"."""
    return "-".join(f.lstrip("-") for f in flags) or "defaults"


def sweep(a):
    """Train (or reuse) each setting's model and sample it: a list of (label, samples, metrics) and of failures.
    A model's test bits/dim (VDM) are copied from its training metrics into the row's."""
    rows, notes, trained = [], [], {}
    for label, script, train_flags, sample_flags in SWEEPS[a.sweep]:
        out = os.path.join(a.out, flags_name(train_flags))
        if out not in trained:
            trained[out] = train(a, label, script, out, train_flags + (["--steps", str(a.steps)] if a.steps else []))
        if trained[out]:
            notes.append(f"{label}: {trained[out]}")
            continue
        got = sample_one(a, label, script, out, flags_name(sample_flags), sample_flags)
        if isinstance(got, str):
            notes.append(got)
            continue
        bound = {}
        if os.path.isfile(os.path.join(out, "metrics.json")):    # written at the end of training
            with open(os.path.join(out, "metrics.json")) as f:
                bound = {k: v for k, v in json.load(f).items() if k.startswith("test_")}
        rows.append((label, got[0], dict(got[1], **bound)))
    return rows, notes


def sweep_table(a, rows, ref, notes):
    """The sweep's markdown table: setting, NFE, s/100, peak memory while sampling, quality, coverage (and the test
    bits/dim where the models report them)."""
    bound = any("test_bpd" in m for _, _, m, _ in rows)
    head = "| setting | steps | NFE | s / 100 samples | peak memory (MiB) | quality | coverage |" + \
        (" test bits/dim (recon, prior, diff) |" if bound else "")
    budget = f"{a.steps} training steps" if a.steps else "each script's default training budget"
    what = f"{a.data}" + (f" ({', '.join(a.classes)})" if a.classes else "") + f" {a.image_size}x{a.image_size}"
    lines = [f"`python trilemma.py {' '.join(a.argv)}` at commit `{commit()}`: {what}, {budget}, {a.n_samples} "
             f"samples per row, device {device(a.device)}. Peak memory: of the --sample-only process, its peak "
             "resident set on the CPU (Python, torch, the checkpoint and the sampler), the most its CUDA tensors "
             "held on a GPU.", "",
             head, "|---" * (head.count("|") - 1) + "|"]
    for label, _, m, s in rows:
        quality, coverage = cells(a, s)
        mem = "-" if m.get("peak_mem_mb") is None else f"{m['peak_mem_mb']:.0f}"
        lines.append(f"| {label} | {m.get('step', '-')} | {m['nfe']} | {m['sec_per_100']:.3g} | {mem} | {quality} | "
                     f"{coverage} |" +
                     (f" {m['test_bpd']:.3f} ({m['test_recon']:.3f}, {m['test_prior']:.4f}, {m['test_diff']:.3f}) |"
                      if "test_bpd" in m else " - |" if bound else ""))
    quality, coverage = cells(a, ref["row"], real=True)
    lines.append(f"| real data (train vs test) | - | - | - | - | {quality} | {coverage} |" + (" - |" if bound else ""))
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def sweep_picture(rows, ref, path, n=12):
    """One PNG: a row of n samples per setting under the real images, each row labelled on its left."""
    labels, sets = ["real data"] + [label for label, _, _, _ in rows], [ref["real"]] + [x for _, x, _, _ in rows]
    strips = []
    for k, x in enumerate(sets):
        tmp = f"{path}.{k}.strip.png"
        data.save_grid(x[:n], tmp, nrow=n)
        strips.append(Image.open(tmp).convert("RGB"))
        os.remove(tmp)
    font, gap = ImageFont.load_default(size=15), 4
    left = 12 + max(int(ImageDraw.Draw(strips[0]).textlength(label, font=font)) for label in labels)
    canvas = Image.new("RGB", (left + max(p.width for p in strips), sum(p.height + gap for p in strips)),
                       (255, 255, 255))
    draw, top = ImageDraw.Draw(canvas), 0
    for p, label in zip(strips, labels):
        canvas.paste(p, (left, top))
        draw.text((4, top + p.height // 2 - 8), label, fill=(0, 0, 0), font=font)
        top += p.height + gap
    canvas.save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------------
# Command line
def get_parser():
    p = data.Parser(prog="trilemma.py", allow_abbrev=False, description="Train and sample DDPM, VDM, DDGAN and "
                    "shortcut MCMC on the same data; one table of speed, quality and coverage.")   # errors: one line
    p.add_argument("--data", default="glyphs-mono", help="glyphs-mono (default: one-channel digits) | glyphs (colour) "
                   "| 25gaussians | swirl | cifar10 | stackedmnist | mnist | path to an image folder")
    p.add_argument("--data-dir", default="./data", help="where cifar10 (a torchvision copy or cifar10-jpeg.tar.gz) "
                   "and MNIST are, e.g. ../shared/data")
    p.add_argument("--classes", nargs="+", default=None, help="keep these classes (names or indices), e.g. airplane")
    p.add_argument("--image-size", type=int, default=16, help="images are resized to this size")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, help="which methods to run "
                   "(default: all four)")
    p.add_argument("--quick", action="store_true", help="CPU-sized budget: the whole run within ~30 min on 2 cores")
    p.add_argument("--steps", type=int, default=None, help="training steps of every method (default: the setting's; "
                   "with --sweep, each script's own)")
    p.add_argument("--n-samples", type=int, default=None, help="samples per sampler for the scores (default: the "
                   f"setting's; with --sweep {SWEEP_SAMPLES} per row)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size of every method (default: each script's)")
    p.add_argument("--ch", type=int, default=None, help="UNet base channels of every method (default: each script's)")
    p.add_argument("--ch-mult", type=int, nargs="+", default=None, help="UNet channel multipliers (default: each "
                   "script's)")
    p.add_argument("--num-res-blocks", type=int, default=None, help="UNet residual blocks per level (default: each "
                   "script's)")
    p.add_argument("--hidden", type=int, default=None, help="2-D MLP width (default: each script's)")
    p.add_argument("--layers", type=int, default=None, help="2-D MLP hidden layers (default: each script's)")
    p.add_argument("--sweep", choices=list(SWEEPS), default=None, help="instead of the four methods, one method "
                   "over a row of settings, each with its script's default training budget: ddpm-T (DDPM's T and "
                   "schedule, DDIM), vdm-T (VDM's number of steps), ddpm-report (the report's UNet at T = 1000 and "
                   "2000, for --data cifar10 --classes airplane); writes sweep.png")
    p.add_argument("--out", default=None, help="folder for the runs, table.md, results.json and the picture "
                   "(default runs/trilemma, with --sweep runs/<sweep>)")
    p.add_argument("--reuse", action="store_true", help="reuse the checkpoints in OUT where they are what this "
                   "command would train (train the rest)")
    p.add_argument("--seed", type=int, default=0, help="random seed of training and sampling")
    p.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto", help="where every method runs")
    return p


def main(argv=None):
    parser = get_parser()
    a = parser.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    setting = SETTINGS["quick" if a.quick else "full"]["2d" if data.is_2d(a.data) else "image"]
    if a.sweep and (a.quick or a.methods):
        parser.error("--sweep trains its own rows with each script's budget: drop --quick and --methods")
    a.methods = a.methods or list(METHODS)
    if a.sweep:                                                  # each script's own budget unless --steps is given
        a.out = a.out or os.path.join("runs", a.sweep)
        a.n_samples = SWEEP_SAMPLES if a.n_samples is None else a.n_samples
    a.out = a.out or "runs/trilemma"
    a.steps = setting["steps"] if a.steps is None and not a.sweep else a.steps
    if a.n_samples is None:
        a.n_samples = 1024 if a.data == "swirl" else setting["n_samples"]     # swirl: all 1024 held-out points
    if (a.steps is not None and a.steps < 1) or a.n_samples < 2:
        parser.error("--steps must be at least 1 and --n-samples at least 2")
    if a.sweep and data.is_2d(a.data):
        parser.error("--sweep runs on images: choose an image --data")
    try:                                                         # bad data flags fail here, before any training
        data.load(a.data, "train", a.image_size, a.data_dir, a.classes, a.seed)
    except ValueError as e:
        parser.error(str(e))
    runs = sorted({flags_name(r[2]) for r in SWEEPS[a.sweep]}) if a.sweep else a.methods
    exists = [m for m in runs if os.path.exists(os.path.join(a.out, m, "ckpt.pt"))]
    if exists and not a.reuse:
        parser.error(f"{a.out} holds checkpoints of {', '.join(exists)}: pass --reuse to sample them again, "
                     "or choose another --out")
    os.makedirs(a.out, exist_ok=True)
    torch.set_flush_denormal(True)
    if a.sweep:
        return main_sweep(a)
    print(f"trilemma | data {a.data} | methods {' '.join(a.methods)} | {a.steps} steps each | {a.n_samples} samples "
          f"per sampler | device {device(a.device)} | out {a.out}", flush=True)

    rows, notes = [], []
    for method in a.methods:
        out = os.path.join(a.out, method)
        if not os.path.isfile(os.path.join(HERE, METHODS[method][0])):
            notes.append(f"{method}: {METHODS[method][0]} is missing next to trilemma.py: skipped")
            print(notes[-1], flush=True)
            continue
        why = train(a, method, METHODS[method][0], out,
                    ["--steps", str(a.steps), *TRAIN_EXTRA.get(method, lambda steps: [])(a.steps)])
        if why:
            notes.append(f"{method}: {why}")
            print(notes[-1], flush=True)
            continue
        sampled, failed = sample(a, method, out)
        notes += failed
        rows += [(method, x, m, None) for tag, x, m in sampled]
    ref = reference(a, a.n_samples)
    rows = [(method, x, m, score(a, x, ref)) for method, x, m, _ in rows]

    md = table(a, rows, ref, notes)
    print("\n" + md, flush=True)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(md)
    results = dict(args={k: v for k, v in vars(a).items()}, real=ref["row"],
                   rows=[dict(method=method, **{k: m[k] for k in ("sampler", "nfe", "sec_per_100", "step")
                                                if k in m}, **s) for method, _, m, s in rows], notes=notes)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    picture(a, rows, ref, os.path.join(a.out, "trilemma.png"))
    print(f"wrote {os.path.join(a.out, 'table.md')}, results.json and trilemma.png", flush=True)
    return 1 if notes and not rows else 0


def main_sweep(a):
    """--sweep: train and sample each setting, score every row against the same real data, write the outputs."""
    print(f"trilemma --sweep {a.sweep} | data {a.data} | {len(SWEEPS[a.sweep])} rows | {a.n_samples} samples per "
          f"row | device {device(a.device)} | out {a.out}", flush=True)
    rows, notes = sweep(a)
    ref = reference(a, a.n_samples)
    rows = [(label, x, m, score(a, x, ref)) for label, x, m in rows]
    md = sweep_table(a, rows, ref, notes)
    print("\n" + md, flush=True)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(md)
    results = dict(args=vars(a), real=ref["row"], notes=notes,
                   rows=[{"setting": label, **{k: v for k, v in m.items()
                                               if v is None or isinstance(v, (int, float, str))}, **s}
                         for label, _, m, s in rows])          # the scores of the sweep replace the script's own
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if rows:
        sweep_picture(rows, ref, os.path.join(a.out, "sweep.png"))
    print(f"wrote {os.path.join(a.out, 'table.md')}, results.json and sweep.png", flush=True)
    return 1 if notes and not rows else 0


if __name__ == "__main__":
    sys.exit(main())
