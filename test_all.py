"""All tests, CPU-only and offline: math identities, smoke runs of every script, the command line end to end.

Run: python -m pytest -q test_all.py   (a few minutes on 2 cores)
Real data from ../shared/data is used where present; those tests skip cleanly without it.
"""
import json
import math
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
SHARED = os.path.join(HERE, "..", "shared", "data")

import data  # noqa: E402
import ddpm  # noqa: E402
import unet  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def run_cli(script, *args, cwd=None):
    """Run a script as a user would; returns the CompletedProcess (stdout + stderr captured)."""
    return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory):
    """A few real CIFAR-10 JPEGs (two classes, train and test) extracted from ../shared/data."""
    tarball = os.path.join(SHARED, "cifar10-jpeg.tar.gz")
    if not os.path.exists(tarball):
        pytest.skip("../shared/data/cifar10-jpeg.tar.gz not present")
    root = tmp_path_factory.mktemp("cifar")
    want = {f"{split}/{c}/{i:04d}.jpg" for split in ("train", "test") for c in ("airplane", "automobile")
            for i in range(12)}
    with tarfile.open(tarball) as tf:
        members = [m for m in tf.getmembers() if m.name.lstrip("./") in want]
        tf.extractall(root, members=members, filter="data")
    if not members:
        pytest.skip("unexpected layout of cifar10-jpeg.tar.gz")
    return str(root)


# ====================================================================================================
# DDPM: math
@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1, 2, 4, 20, 50, 1000, 4000])
def test_schedule_valid_for_every_T(kind, T):
    s = ddpm.make_schedule(T, kind)
    beta, ab = s["beta"].double(), s["alpha_bar"].double()
    assert beta.shape == (T,) and torch.all(beta > 0) and torch.all(beta < 1)
    assert torch.all(ab[1:] < ab[:-1])                                 # monotone decreasing
    if T in (4, 50, 1000):
        assert ab[-1] < 1e-3                                           # x_T is close to N(0, I)


def test_linear_schedule_reproduces_paper_at_T1000():
    beta = ddpm.make_schedule(1000)["beta"].double()
    paper = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert abs(beta[0] - 1e-4) < 2e-5 and abs(beta[-1] - 0.02) < 3e-4
    assert (beta - paper).abs().max() < 3e-4


def test_q_sample_mean_and_variance():
    torch.manual_seed(0)
    s = ddpm.make_schedule(100)
    x0 = torch.full((200_000, 1), 0.7)
    t = torch.full((200_000,), 30, dtype=torch.long)
    xt = ddpm.q_sample(s, x0, t, torch.randn_like(x0))
    ab = s["alpha_bar"][29].item()
    assert abs(xt.mean().item() - math.sqrt(ab) * 0.7) < 0.01
    assert abs(xt.var().item() - (1 - ab)) < 0.01


def test_posterior_matches_gaussian_conditioning():
    """q(x_{t-1} | x_t, x0) from Bayes' rule on q(x_{t-1} | x0) and q(x_t | x_{t-1}), in float64."""
    s = ddpm.make_schedule(50)
    x0, xt = torch.tensor([[0.3], [-0.8]]), torch.tensor([[1.1], [0.2]])
    for step in (2, 17, 50):
        t = torch.full((2,), step, dtype=torch.long)
        mean, var = ddpm.q_posterior(s, x0, xt, t)
        ab_prev, alpha = s["alpha_bar_prev"][step - 1].double(), s["alpha"][step - 1].double()
        beta = 1 - alpha
        prec = 1 / (1 - ab_prev) + alpha / beta
        mean_ref = (ab_prev.sqrt() * x0.double() / (1 - ab_prev) + alpha.sqrt() * xt.double() / beta) / prec
        assert torch.allclose(mean.double(), mean_ref, atol=1e-5)
        assert torch.allclose(var.double().flatten(), (1 / prec).expand(2), rtol=1e-4)


def toy_eps(T):
    """A fixed, non-trivial eps_theta(x_t, t) for sampler identities."""
    return lambda x, t, y=None: torch.tanh(0.5 * x + t.float().view(-1, *[1] * (x.dim() - 1)) / T)


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta1_full_equals_ancestral_beta_tilde(clip):
    T, shape = 30, (4, 3, 2, 2)
    s = ddpm.make_schedule(T)
    a = ddpm.sample_ancestral(toy_eps(T), s, shape, var="beta_tilde", clip=clip,
                              generator=torch.Generator().manual_seed(1))
    b = ddpm.sample_ddim(toy_eps(T), s, shape, S=T, eta=1.0, clip=clip, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a, b, atol=1e-4)
    c = ddpm.sample_ancestral(toy_eps(T), s, shape, var="beta", clip=clip, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c, atol=1e-4)                          # the variance choice matters


def test_ddim_steps_and_eta0_is_deterministic_given_x_T():
    assert ddpm.ddim_steps(1000, 50)[0] == 1000 and ddpm.ddim_steps(1000, 50)[-1] == 1
    assert len(ddpm.ddim_steps(1000, 50)) == 50 and ddpm.ddim_steps(7, 7) == list(range(7, 0, -1))
    T, s = 40, ddpm.make_schedule(40)
    a = ddpm.sample_ddim(toy_eps(T), s, (3, 2), S=10, eta=0.0, clip=False, generator=torch.Generator().manual_seed(5))
    b = ddpm.sample_ddim(toy_eps(T), s, (3, 2), S=10, eta=0.0, clip=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_ancestral_last_step_returns_x0_hat():
    """At t = 1 the posterior mean is x0_hat itself (coef_x0 = 1, coef_xt = 0) and no noise is added."""
    s = ddpm.make_schedule(10)
    assert abs(s["coef_x0"][0].item() - 1) < 1e-5 and abs(s["coef_xt"][0].item()) < 1e-5


def test_loss_simple_is_finite_and_trains_every_parameter():
    torch.manual_seed(0)
    model = unet.UNet(in_ch=3, ch=16, ch_mult=(1, 2), num_res_blocks=1, image_size=8)
    s = ddpm.make_schedule(100)
    net = ddpm.eps_fn(model, 100, "float32")
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    loss = ddpm.loss_simple(net, s, x0)
    assert torch.isfinite(loss) and 0.5 < loss.item() < 1.5             # zero-initialised output: ~E[eps^2] = 1
    loss.backward()
    assert model.conv_out.weight.grad.abs().sum() > 0                  # the zero-initialised output conv learns


# ====================================================================================================
# unet.py
def _t(B):
    return torch.rand(B) * 1000


@pytest.mark.parametrize("kwargs, y, z", [
    (dict(), None, None),                                        # plain
    (dict(num_classes=10), torch.tensor([0, 9, -1, 3]), None),   # labels incl. the null class
    (dict(num_classes=10), None, None),                          # y=None -> all null
    (dict(z_dim=8), None, torch.randn(4, 8)),                    # DDGAN generator latent
    (dict(num_classes=10, z_dim=8), torch.tensor([1, -1, 2, 5]), torch.randn(4, 8)),
])
def test_unet_shapes(kwargs, y, z):
    torch.manual_seed(0)
    m = unet.UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, image_size=8, **kwargs)
    out = m(torch.randn(4, 3, 8, 8), _t(4), y=y, z=z)
    assert out.shape == (4, 3, 8, 8)


def test_unet_mnist_attention_tanh():
    torch.manual_seed(0)
    m = unet.UNet(in_ch=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_res=(4,), image_size=8, out_act="tanh")
    assert any(isinstance(mod, unet._Attention) for mod in m.modules())
    for p in m.conv_out.parameters():  # make the output non-trivial so tanh's range is tested
        torch.nn.init.normal_(p, std=10.0)
    out = m(torch.randn(3, 1, 8, 8), _t(3))
    assert out.shape == (3, 1, 8, 8)
    assert out.abs().max() <= 1 and out.abs().max() > 0.5


def test_unet_out_ch():
    m = unet.UNet(in_ch=3, out_ch=6, ch=16, ch_mult=(1,), num_res_blocks=1, image_size=4)
    assert m(torch.randn(2, 3, 4, 4), _t(2)).shape == (2, 6, 4, 4)


def test_unet_bad_image_size():
    with pytest.raises(ValueError, match="image size 18 cannot be halved 3 times"):
        unet.UNet(ch=16, ch_mult=(1, 2, 2, 2), image_size=18)
    with pytest.raises(ValueError):
        unet.Discriminator(ch=16, ch_mult=(1, 2, 2), image_size=6)
    with pytest.raises(ValueError):
        unet.UNet(ch=16, ch_mult=(1, 2), image_size=8, attn_res=(16,))  # not a resolution of this net


def test_unet_zero_at_init_but_trainable():
    torch.manual_seed(0)
    m = unet.UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_res=(4,), image_size=8, dropout=0.0)
    x, t = torch.randn(4, 3, 8, 8), _t(4)
    assert m(x, t).abs().max() == 0
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ((m(x, t) - x) ** 2).mean().backward()  # at init only conv_out has a gradient
    opt.step()
    opt.zero_grad()
    ((m(x, t) - x) ** 2).mean().backward()
    assert m.conv_in.weight.grad.abs().sum() > 0  # after one step the gradient reaches the input conv


def test_discriminator_logits_and_r1():
    torch.manual_seed(0)
    d = unet.Discriminator(in_ch=6, ch=16, ch_mult=(1, 2), num_res_blocks=1, image_size=8)
    for B in (4, 6, 7, 1):  # 6 and 7 are not divisible by the group size 4
        assert d(torch.randn(B, 6, 8, 8), _t(B)).shape == (B,)
    x = torch.randn(6, 6, 8, 8, requires_grad=True)
    logits = d(x, _t(6))
    assert logits.abs().min() > 0
    (g,) = torch.autograd.grad(logits.sum(), x, create_graph=True)  # R1: grad wrt the real input
    r1 = g.pow(2).sum()
    r1.backward()  # double backward reaches D's parameters
    assert torch.isfinite(r1) and r1 > 0
    assert d.conv_in.weight.grad.abs().sum() > 0


def test_mlp_shapes():
    x, t = torch.randn(5, 2), _t(5)
    den = unet.MLP(hidden=32, num_classes=3)
    assert den(x, t).shape == (5, 2) and den(x, t).abs().max() == 0  # zero_out: denoiser starts at 0
    assert den(x, t, y=torch.tensor([0, 1, 2, -1, 0])).shape == (5, 2)
    gen = unet.MLP(hidden=32, z_dim=4, out_act="tanh")
    assert gen(x, t, z=torch.randn(5, 4)).shape == (5, 2)
    disc = unet.MLP(in_dim=4, out_dim=1, hidden=32, zero_out=False)
    logits = disc(torch.randn(5, 4), t)
    assert logits.shape == (5, 1) and logits.abs().min() > 0


def test_timestep_embedding():
    e = unet.timestep_embedding(torch.tensor([0.0, 1.0, 999.0]), 9)
    assert e.shape == (3, 9)
    assert torch.allclose(e[0, :4], torch.zeros(4)) and torch.allclose(e[0, 4:8], torch.ones(4))
