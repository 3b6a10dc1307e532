"""The course's U-Net noise predictor eps_theta(x_t, t), in the style of lucidrains/denoising-diffusion-pytorch.

Shape of the network at dim=16, dim_mults=(1, 2, 4, 8) on 32x32 inputs:
    stem 7x7 conv -> 16 ch @ 32
    down: [16 @ 32] -> [32 @ 16] -> [64 @ 8] -> [128 @ 4]  (two ResNet blocks + linear attention per level)
    middle: ResNet block, full attention, ResNet block @ 4x4
    up: the mirror image, each ResNet block concatenating one skip from the down path
    final ResNet block on [up output, stem output] and a 1x1 conv back to `out_dim` channels.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class SinusoidalPositionEmbeddings(nn.Module):
    """Transformer-style embedding of the (integer) diffusion step."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, time):
        half_dim = self.dim // 2
        frequencies = torch.exp(torch.arange(half_dim, device=time.device) * -(math.log(10000) / (half_dim - 1)))
        angles = time.float()[:, None] * frequencies[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class Block(nn.Module):
    """3x3 conv -> GroupNorm -> (optional FiLM scale/shift from the time embedding) -> SiLU."""

    def __init__(self, dim, dim_out, groups=8):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x, scale_shift=None):
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    """Two Blocks with a residual connection; the time embedding sets the first block's scale and shift."""

    def __init__(self, dim, dim_out, *, time_emb_dim, groups=8):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out, groups=groups)
        self.block2 = Block(dim_out, dim_out, groups=groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, time_emb):
        scale_shift = self.mlp(time_emb)[:, :, None, None].chunk(2, dim=1)
        h = self.block1(x, scale_shift=scale_shift)
        h = self.block2(h)
        return h + self.res_conv(x)


class LinearAttention(nn.Module):
    """Attention whose cost is linear in the number of pixels (softmax over features, then over keys)."""

    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        hidden_dim = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden_dim, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = (part.reshape(b, self.heads, -1, h * w) for part in self.to_qkv(x).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, -1, h, w))


class Attention(nn.Module):
    """Full multi-head self-attention over the pixels (used at the lowest resolution only)."""

    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.heads = heads
        hidden_dim = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        # (b, heads, pixels, dim_head) for scaled_dot_product_attention
        q, k, v = (part.reshape(b, self.heads, -1, h * w).transpose(-1, -2) for part in self.to_qkv(x).chunk(3, dim=1))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(-1, -2).reshape(b, -1, h, w))


class PreNormResidual(nn.Module):
    """x + fn(GroupNorm(x))."""

    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.GroupNorm(1, dim)
        self.fn = fn

    def forward(self, x):
        return x + self.fn(self.norm(x))


class Unet(nn.Module):
    def __init__(self, dim, init_dim=None, out_dim=None, dim_mults=(1, 2, 4, 8), channels=3, resnet_block_groups=8):
        super().__init__()
        self.channels = channels
        init_dim = init_dim or dim
        self.out_dim = out_dim or channels
        self.init_conv = nn.Conv2d(channels, init_dim, 7, padding=3)

        dims = [init_dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(
            SinusoidalPositionEmbeddings(dim), nn.Linear(dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim)
        )

        def resnet(dim_in, dim_out):
            return ResnetBlock(dim_in, dim_out, time_emb_dim=time_dim, groups=resnet_block_groups)

        self.downs = nn.ModuleList()
        for level, (dim_in, dim_out) in enumerate(in_out):
            is_last = level == len(in_out) - 1
            self.downs.append(
                nn.ModuleList(
                    [
                        resnet(dim_in, dim_in),
                        resnet(dim_in, dim_in),
                        PreNormResidual(dim_in, LinearAttention(dim_in)),
                        # stride-2 conv halves the resolution; the deepest level keeps it
                        nn.Conv2d(dim_in, dim_out, 4, 2, 1) if not is_last else nn.Conv2d(dim_in, dim_out, 3, padding=1),
                    ]
                )
            )

        mid_dim = dims[-1]
        self.mid_block1 = resnet(mid_dim, mid_dim)
        self.mid_attn = PreNormResidual(mid_dim, Attention(mid_dim))
        self.mid_block2 = resnet(mid_dim, mid_dim)

        self.ups = nn.ModuleList()
        for level, (dim_in, dim_out) in enumerate(reversed(in_out)):
            is_last = level == len(in_out) - 1
            self.ups.append(
                nn.ModuleList(
                    [
                        resnet(dim_out + dim_in, dim_out),
                        resnet(dim_out + dim_in, dim_out),
                        PreNormResidual(dim_out, LinearAttention(dim_out)),
                        nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim_out, dim_in, 3, padding=1))
                        if not is_last
                        else nn.Conv2d(dim_out, dim_in, 3, padding=1),
                    ]
                )
            )

        self.final_res_block = resnet(init_dim * 2, dim)
        self.final_conv = nn.Conv2d(dim, self.out_dim, 1)

    def forward(self, x, time):
        x = self.init_conv(x)
        stem = x
        t = self.time_mlp(time)

        skips = []
        for block1, block2, attn, downsample in self.downs:
            x = block1(x, t)
            skips.append(x)
            x = attn(block2(x, t))
            skips.append(x)
            x = downsample(x)

        x = self.mid_block2(self.mid_attn(self.mid_block1(x, t)), t)

        for block1, block2, attn, upsample in self.ups:
            x = block1(torch.cat((x, skips.pop()), dim=1), t)
            x = attn(block2(torch.cat((x, skips.pop()), dim=1), t))
            x = upsample(x)

        x = self.final_res_block(torch.cat((x, stem), dim=1), t)
        return self.final_conv(x)
