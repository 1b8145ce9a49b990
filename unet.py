"""Networks shared by the four methods: the DDPM UNet, DDGAN's discriminator, and a small MLP for 2-D data.

UNet follows Ho, Jain & Abbeel 2020 (DDPM, arXiv 2006.11239, Appendix B): a Wide-ResNet/PixelCNN++ style
UNet with GroupNorm, swish (SiLU), a sinusoidal time embedding fed through an MLP and added in every
residual block, single-head self-attention at chosen resolutions, and zero-initialised last convolutions.
With ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,) at 32x32 it is the 35.7M-parameter
CIFAR-10 model. Two optional extras serve the other methods: class labels (with a null class for
classifier-free guidance) and a latent z that modulates every GroupNorm (DDGAN's generator, Xiao et al. 2022,
arXiv 2112.07804). Nothing here is method-specific: the networks only map (x, t, ...) to a tensor.

t is always a float tensor (B,) on the scale 0..1000 (DDPM passes its integer step as a float).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim):
    """Sinusoidal embedding of float times t (B,) -> (B, dim), as in the Transformer and DDPM (max period 10000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / max(half - 1, 1))  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, 2 * half)
    if dim % 2:  # odd width: pad one zero column
        emb = F.pad(emb, (0, 1))
    return emb


def _groups(channels):
    """Largest number of GroupNorm groups <= 32 that divides `channels` (32 for the usual widths)."""
    return next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)


def _zero(module):
    """Zero a layer's weights and bias so a residual branch (or the whole output) starts at 0."""
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


def _xavier(layer):
    """Xavier-uniform weights and a zero bias (the official DDGAN init of its z mapping and style layers)."""
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class _Norm(nn.Module):
    """GroupNorm; adaptive when w_dim > 0: GN(h) * (1 + gamma(w)) + beta(w), the DDGAN generator's way in for z."""

    def __init__(self, channels, w_dim=0):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels, affine=w_dim == 0)
        # Xavier-uniform weights and zero bias, as the official DDGAN code's dense(): PyTorch's default Linear init
        # leaves G nearly blind to z (output spread over z ~0.005 against ~0.28 over x_t), i.e. a --no-z model
        self.style = _xavier(nn.Linear(w_dim, 2 * channels)) if w_dim else None

    def forward(self, h, w=None):
        h = self.norm(h)
        if self.style is None:
            return h
        gamma, beta = self.style(w)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        return h * (1 + gamma) + beta


class _Attention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection (zero-init projection)."""

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W).transpose(-1, -2)  # (B, 3, heads=1, HW, C)
        q, k, v = qkv.unbind(1)  # (B, 1, HW, C) each
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, fused where available
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class _ResBlock(nn.Module):
    """DDPM residual block: GN-SiLU-conv, + Linear(temb), GN-SiLU-dropout-conv, 1x1 skip; optional attention after."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout=0.0, attn=False, w_dim=0, zero_init=True):
        super().__init__()
        self.norm1 = _Norm(in_ch, w_dim)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = _Norm(out_ch, w_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if zero_init:  # the block starts as the identity, so a deep UNet trains stably from step 0
            _zero(self.conv2)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = _Attention(out_ch) if attn else nn.Identity()

    def forward(self, x, emb, w=None):
        h = self.conv1(F.silu(self.norm1(x, w)))
        h = h + self.emb(emb)[:, :, None, None]  # time (and class) embedding as a per-channel bias
        h = self.conv2(self.dropout(F.silu(self.norm2(h, w))))
        return self.attn(self.skip(x) + h)


class _Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class _Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling then a 3x3 convolution."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _check_size(image_size, ch_mult):
    """Raise ValueError unless image_size can be halved once per level transition."""
    n = len(ch_mult) - 1
    if image_size < 1 or image_size % 2**n:
        raise ValueError(f"image size {image_size} cannot be halved {n} times by ch_mult {tuple(ch_mult)}: "
                         f"use a multiple of {2**n}")


class UNet(nn.Module):
    """The DDPM UNet eps_theta(x, t) (also used as VDM's score net and DDGAN's x0 generator).

    Optional: num_classes > 0 adds a label embedding (y = -1, or y=None, is the null class); z_dim > 0 maps
    z (B, z_dim) through a PixelNorm + 4-layer MLP to w (B, 256) that modulates every GroupNorm in the
    residual blocks; out_act="tanh" squashes the output into [-1, 1]. The output conv and each residual
    block's last conv are zero-initialised, so a fresh network outputs exactly 0; zero_init=False keeps PyTorch's
    default init there (a GAN generator must vary with z from step 0). y is ignored when num_classes=0, z when
    z_dim=0.
    """

    def __init__(self, in_ch=3, out_ch=None, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_res=(),
                 dropout=0.1, temb_dim=None, image_size=16, num_classes=0, z_dim=0, out_act=None, zero_init=True):
        super().__init__()
        _check_size(image_size, ch_mult)
        resolutions = [image_size // 2**i for i in range(len(ch_mult))]
        if set(attn_res) - set(resolutions):
            raise ValueError(f"attn_res {tuple(attn_res)} must be among the UNet's resolutions {resolutions}")
        if out_act not in (None, "tanh"):
            raise ValueError(f"out_act must be None or 'tanh', not {out_act!r}")
        self.ch, self.num_classes, self.z_dim, self.out_act = ch, num_classes, z_dim, out_act
        temb_dim = temb_dim or 4 * ch
        w_dim = 256 if z_dim else 0

        # time embedding: sinusoid(t, ch) -> Linear -> SiLU -> Linear (DDPM App. B)
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        # +1 row for the null class, stored at index 0 (index = y + 1)
        self.label_emb = nn.Embedding(num_classes + 1, temb_dim) if num_classes else None
        if z_dim:  # DDGAN mapping network: PixelNorm (in forward) then 4 x (Linear(256) + SiLU)
            dims = [z_dim, 256, 256, 256, 256]
            self.mapping = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (_xavier(nn.Linear(a, b)), nn.SiLU())])

        block = dict(emb_dim=temb_dim, dropout=dropout, w_dim=w_dim, zero_init=zero_init)
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        # down path: every module here pushes one skip tensor onto the stack
        self.down = nn.ModuleList()
        skips, c = [ch], ch
        for i, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(_ResBlock(c, ch * mult, attn=resolutions[i] in attn_res, **block))
                c = ch * mult
                skips.append(c)
            if i < len(ch_mult) - 1:
                self.down.append(_Downsample(c))
                skips.append(c)
        # middle at the lowest resolution: Res, Attn, Res
        self.mid = nn.ModuleList([_ResBlock(c, c, attn=True, **block), _ResBlock(c, c, **block)])
        # up path: num_res_blocks + 1 blocks per level, each eating one skip (channel concatenation)
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(_ResBlock(c + skips.pop(), ch * mult, attn=resolutions[i] in attn_res, **block))
                c = ch * mult
            if i > 0:
                self.up.append(_Upsample(c))
        self.norm_out = nn.GroupNorm(_groups(c), c)
        self.conv_out = nn.Conv2d(c, out_ch or in_ch, 3, padding=1)
        if zero_init:  # output starts at exactly 0
            _zero(self.conv_out)

    def forward(self, x, t, y=None, z=None):
        """x (B, in_ch, H, W), t float (B,), y long (B,) or None, z (B, z_dim) -> (B, out_ch, H, W)."""
        emb = self.temb(timestep_embedding(t, self.ch))  # (B, temb_dim)
        if self.num_classes:
            y = torch.full_like(t, -1, dtype=torch.long) if y is None else y
            emb = emb + self.label_emb(y + 1)  # y = -1 (null) -> row 0
        emb = F.silu(emb)  # DDPM applies swish before each block's projection; do it once here
        w = None
        if self.z_dim:
            if z is None:
                raise ValueError(f"this UNet has z_dim={self.z_dim}: pass z of shape (B, {self.z_dim})")
            z = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)  # PixelNorm
            w = self.mapping(z)  # (B, 256)

        h = self.conv_in(x)  # (B, ch, H, W)
        hs = [h]
        for m in self.down:
            h = m(h, emb, w) if isinstance(m, _ResBlock) else m(h)
            hs.append(h)
        for m in self.mid:
            h = m(h, emb, w)  # (B, ch * ch_mult[-1], H / 2^(L-1), W / 2^(L-1))
        for m in self.up:
            h = m(torch.cat([h, hs.pop()], dim=1), emb, w) if isinstance(m, _ResBlock) else m(h)
        out = self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, H, W)
        return torch.tanh(out) if self.out_act == "tanh" else out


class _DBlock(nn.Module):
    """Discriminator block (DDGAN's, after StyleGAN2's residual D): LReLU-conv3x3, + Linear(temb), LReLU-conv3x3
    (stride 2 when down), 1x1 skip; (h + skip) / sqrt(2) keeps the scale. No normalisation: GroupNorm would
    divide out the per-sample statistics (brightness, contrast) that tell a real image from a fake one."""

    def __init__(self, in_ch, out_ch, emb_dim, down):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=2 if down else 1, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, stride=2 if down else 1, bias=False)

    def forward(self, x, emb):
        h = self.conv1(F.leaky_relu(x, 0.2))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.leaky_relu(h, 0.2))
        return (h + self.skip(x)) / math.sqrt(2)


class Discriminator(nn.Module):
    """DDGAN's time-dependent discriminator D(x_{t-1}, x_t, t) -> logit (Xiao et al. 2022, App. B).

    conv_in, then per level `num_res_blocks` residual blocks with the time embedding added (the last one of a
    level halves H and W), LeakyReLU(0.2) and no normalisation; then minibatch standard deviation (one extra
    feature map), conv3x3 + LeakyReLU, sum-pooling over space and a linear head. Default PyTorch init (no
    zero-init): a GAN's D must respond to its input from step 0.

    Simplified from the paper's (official) small D in: (1) downsampling is a stride-2 conv3x3 (and a stride-2 1x1
    skip), not a [1, 3, 3, 1] FIR blur before a stride-1 conv; (2) conv_in is a 3x3 conv to ch, not a 1x1 conv to
    2 ngf; (3) the widths follow ch and ch_mult (CIFAR-10's D: 1x1 to 128, then 128, 256, 512, 512 with three
    halvings, 32 -> 4); (4) the time embedding is sinusoid(ch) -> temb_dim -> temb_dim, not 128 -> 128 -> 128;
    (5) PyTorch's default init, where the official code uses DDPM's variance-scaling init with each block's second
    conv and the final conv started near zero; (6) the minibatch-std group is the largest divisor of B <= 4
    (the official code needs B divisible by min(B, 4)). The block order, the time embedding as a per-block bias,
    minibatch std, sum-pooling and the logit head are the paper's.
    """

    def __init__(self, in_ch=6, ch=64, ch_mult=(1, 2, 2), num_res_blocks=1, temb_dim=None, image_size=16):
        super().__init__()
        _check_size(image_size, ch_mult)
        self.ch = ch
        temb_dim = temb_dim or 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.LeakyReLU(0.2), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = ch
        for i, mult in enumerate(ch_mult):
            for j in range(num_res_blocks):
                last = j == num_res_blocks - 1 and i < len(ch_mult) - 1
                self.down.append(_DBlock(c, ch * mult, temb_dim, down=last))
                c = ch * mult
        self.conv_out = nn.Conv2d(c + 1, c, 3, padding=1)  # +1: the minibatch-std feature map
        self.head = nn.Linear(c, 1)

    @staticmethod
    def minibatch_std(h, group=4):
        """Append the mean std across groups of samples as one feature map (Karras et al. 2018), (B, C+1, H, W).

        The group is the largest divisor of B that is <= `group`, so any batch size works.
        """
        B, C, H, W = h.shape
        g = next(d for d in range(min(group, B), 0, -1) if B % d == 0)
        s = h.reshape(g, B // g, C, H, W)  # sample i is grouped with samples i + B/g, i + 2B/g, ...
        s = torch.sqrt(s.var(dim=0, unbiased=False) + 1e-8)  # (B/g, C, H, W), eps keeps sqrt differentiable at 0
        s = s.mean(dim=(1, 2, 3)).reshape(B // g, 1, 1, 1).repeat(g, 1, H, W)  # (B, 1, H, W)
        return torch.cat([h, s], dim=1)

    def forward(self, x, t):
        """x = cat([x_{t-1}, x_t], 1) (B, in_ch, H, W), t float (B,) -> logits (B,)."""
        emb = F.leaky_relu(self.temb(timestep_embedding(t, self.ch)), 0.2)  # (B, temb_dim)
        h = self.conv_in(x)
        for m in self.down:
            h = m(h, emb)
        h = self.minibatch_std(F.leaky_relu(h, 0.2))  # (B, C + 1, h, w)
        h = F.leaky_relu(self.conv_out(h), 0.2)  # (B, C, h, w)
        return self.head(h.sum(dim=(2, 3))).squeeze(1)  # sum-pool (B, C) -> (B,)


class SmallDiscriminator(nn.Module):
    """A small spectrally normalised D(x_{t-1}, x_t, t) -> logit for CPU budgets (a DCGAN-style D; not the paper's).

    conv3x3 (in_ch -> ch), conv4x4/2 (ch -> 2 ch), conv4x4/2 (2 ch -> 4 ch), each spectrally normalised and followed
    by LeakyReLU(0.2), then a linear head on the flattened features. t enters twice, both zero-initialised so that
    a fresh D is a plain image D: as a per-channel bias after the first conv, and as a projection term
    <e(t), sum-pooled features> (Miyato & Koyama 2018). Unlike the paper's D it adds no time embedding deep in the
    network, where on 16x16 digits it is as large as the image signal, and it has no minibatch-std feature.
    """

    def __init__(self, in_ch=2, ch=32, image_size=16, temb_dim=128):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"SmallDiscriminator needs an image size divisible by 4, got {image_size}")
        sn = nn.utils.parametrizations.spectral_norm
        self.ch = ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.LeakyReLU(0.2))
        self.t_bias = _zero(nn.Linear(temb_dim, ch))
        self.t_proj = _zero(nn.Linear(temb_dim, 4 * ch))
        self.convs = nn.ModuleList([sn(nn.Conv2d(in_ch, ch, 3, padding=1)), sn(nn.Conv2d(ch, 2 * ch, 4, 2, 1)),
                                    sn(nn.Conv2d(2 * ch, 4 * ch, 4, 2, 1))])
        self.head = sn(nn.Linear(4 * ch * (image_size // 4) ** 2, 1))

    def forward(self, x, t):
        """x = cat([x_{t-1}, x_t], 1) (B, in_ch, H, W), t float (B,) -> logits (B,)."""
        emb = self.temb(timestep_embedding(t, self.ch))  # (B, temb_dim)
        h = self.convs[0](x) + self.t_bias(emb)[:, :, None, None]
        for conv in self.convs[1:]:
            h = conv(F.leaky_relu(h, 0.2))
        h = F.leaky_relu(h, 0.2)  # (B, 4 ch, H / 4, W / 4)
        return self.head(h.flatten(1)).squeeze(1) + (self.t_proj(emb) * h.sum(dim=(2, 3))).sum(1)


class MLP(nn.Module):
    """An MLP with the UNet's call signature, for 2-D data: denoiser, DDGAN generator (z_dim) or DDGAN D.

    x (concatenated with z when z_dim > 0) -> `layers` hidden layers of width `hidden` with SiLU (or
    LeakyReLU(0.2), act="lrelu", the usual GAN discriminator nonlinearity) -> Linear. x is multiplied by in_scale
    on the way in and the output by out_scale: DDGAN's 2-D nets see points x 4, so that the default-initialised
    first layer, whose kinks lie within about +-1 of the origin, resolves modes of std 0.05 spread over +-4.
    The time (and class) embedding is added to every hidden layer's pre-activation. zero_out zero-initialises
    the output layer so a denoiser starts at 0; a discriminator passes zero_out=False.
    """

    def __init__(self, in_dim=2, out_dim=None, hidden=512, layers=3, num_classes=0, z_dim=0, out_act=None,
                 zero_out=True, act="silu", in_scale=1.0, out_scale=1.0):
        super().__init__()
        if out_act not in (None, "tanh"):
            raise ValueError(f"out_act must be None or 'tanh', not {out_act!r}")
        if act not in ("silu", "lrelu"):
            raise ValueError(f"act must be 'silu' or 'lrelu', not {act!r}")
        self.num_classes, self.z_dim, self.out_act = num_classes, z_dim, out_act
        self.in_scale, self.out_scale = in_scale, out_scale
        self.act = F.silu if act == "silu" else lambda h: F.leaky_relu(h, 0.2)
        self.temb = nn.Linear(128, hidden)  # sinusoid(t, 128) -> hidden
        self.label_emb = nn.Embedding(num_classes + 1, hidden) if num_classes else None  # null class at 0
        self.hidden = nn.ModuleList([nn.Linear(in_dim + z_dim, hidden)] +
                                    [nn.Linear(hidden, hidden) for _ in range(layers - 1)])
        self.out = nn.Linear(hidden, out_dim or in_dim)
        if zero_out:
            _zero(self.out)

    def forward(self, x, t, y=None, z=None):
        """x (B, in_dim), t float (B,), y long (B,) or None, z (B, z_dim) -> (B, out_dim)."""
        emb = self.temb(timestep_embedding(t, 128))  # (B, hidden)
        if self.num_classes:
            y = torch.full_like(t, -1, dtype=torch.long) if y is None else y
            emb = emb + self.label_emb(y + 1)
        x = x * self.in_scale
        if self.z_dim:
            if z is None:
                raise ValueError(f"this MLP has z_dim={self.z_dim}: pass z of shape (B, {self.z_dim})")
            x = torch.cat([x, z], dim=1)  # (B, in_dim + z_dim)
        h = x
        for layer in self.hidden:
            h = self.act(layer(h) + emb)
        out = self.out(h) * self.out_scale  # (B, out_dim)
        return torch.tanh(out) if self.out_act == "tanh" else out
