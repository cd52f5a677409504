"""CT-CLIP's image encoder: the encoder half of ``CTViT`` (patch embedding, factorised spatial then temporal
transformers with causal depthwise-convolution position encodings, cosine-similarity vector quantiser),
its encoded tokens averaged as TumorImagingBench ran it: 512-d.

Key names are those of ``CT-CLIP_v2.pt`` under ``visual_transformer.``; the decoder, the first-frame patch
embedding, the perceptual and GAN losses and the quantiser's training statistics are not built. Upstream
quirks that shape the numbers are kept: keys and values are projected from the un-normalised tokens, and the
temporal position encoding reads its ``(b h w) t`` tokens as if they were laid out ``b t h w``.
"""

from __future__ import annotations

from ..util.optional import optional_import

torch = optional_import("torch", "embed")
F = torch.nn.functional
nn = torch.nn


class BiaslessLayerNorm(nn.Module):
    """Layer norm with a learnt gain and a fixed zero bias (upstream's ``gamma`` and ``beta`` buffer)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class CausalPositionConv(nn.Module):
    """PEG: a depthwise 3³ convolution over (t, h, w), padded causally along t, of the tokens reshaped to
    ``shape`` = (b, t, h, w)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dsconv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, x: torch.Tensor, shape: tuple) -> torch.Tensor:
        grid = x.reshape(*shape, -1).permute(0, 4, 1, 2, 3)
        grid = self.dsconv(F.pad(grid, (1, 1, 1, 1, 2, 0)))
        return grid.permute(0, 2, 3, 4, 1).reshape(x.shape)


class CosineAttention(nn.Module):
    """Multi-head self-attention on L2-normalised queries and keys with learnt per-dimension scales and a
    fixed temperature of 8; ``context_norm`` and the empty ``null_kv`` are kept for the checkpoint's keys."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm = BiaslessLayerNorm(dim)
        self.context_norm = BiaslessLayerNorm(dim)
        self.null_kv = nn.Parameter(torch.zeros(heads, 0, dim_head))
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, _ = x.shape
        k, v = self.to_kv(x).chunk(2, dim=-1)
        q = self.to_q(self.norm(x))
        q, k, v = (t.reshape(batch, tokens, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        q = F.normalize(q, dim=-1) * self.q_scale
        k = F.normalize(k, dim=-1) * self.k_scale
        similarity = q @ k.transpose(-1, -2) * 8.0
        if bias is not None:
            similarity = similarity + bias
        out = similarity.softmax(dim=-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(batch, tokens, -1))


class _GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * x


class GatedFeedForward(nn.Sequential):
    """Layer norm, a GEGLU of inner width 4·2/3·dim, and the projection back (no biases); the identity
    stands where upstream has a (zero) dropout, so that the indices, hence the key names, are upstream's."""

    def __init__(self, dim: int):
        inner = int(4 * (2 / 3) * dim)
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner * 2, bias=False),
            _GEGLU(),
            nn.Identity(),
            nn.Linear(inner, dim, bias=False),
        )


class FactorisedTransformer(nn.Module):
    """``depth`` layers of [position conv, attention, (no cross-attention), feed-forward], residual, then a
    final norm (upstream's ``Transformer`` with ``peg=True, peg_causal=True``)."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([CausalPositionConv(dim), CosineAttention(dim, dim_head, heads), None, GatedFeedForward(dim)])
            for _ in range(depth)
        )
        self.norm_out = BiaslessLayerNorm(dim)

    def forward(self, x: torch.Tensor, shape: tuple, bias: torch.Tensor | None = None) -> torch.Tensor:
        for position, attention, _, feed_forward in self.layers:
            x = position(x, shape) + x
            x = attention(x, bias) + x
            x = feed_forward(x) + x
        return self.norm_out(x)


class ContinuousPositionBias(nn.Module):
    """Per-head attention bias from an MLP of the log-scaled relative (h, w) offsets of two patches."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.net = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(2, dim), nn.LeakyReLU(0.1)),
                nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.1)),
                nn.Linear(dim, heads),
            ]
        )

    def forward(self, height: int, width: int) -> torch.Tensor:
        device = self.net[2].weight.device
        grid = torch.stack(
            torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
        )
        grid = grid.reshape(2, -1).T
        relative = (grid[:, None, :] - grid[None, :, :]).float()
        relative = torch.sign(relative) * torch.log(relative.abs() + 1)
        for layer in self.net:
            relative = layer(relative)
        return relative.permute(2, 0, 1)


class CosineCodebook(nn.Module):
    """The quantiser's codebook (``_codebook.embed``, 1 x size x dim; vector-quantize-pytorch 1.1.2, as
    CT-CLIP pins): each token becomes the entry of highest cosine similarity, returned as stored (the
    entries are compared normalised but not normalised on output)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("embed", torch.zeros(1, size, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        codebook = self.embed[0]
        codes = (F.normalize(tokens, dim=-1) @ F.normalize(codebook, dim=-1).T).argmax(dim=-1)
        return codebook[codes]


class VectorQuantizer(nn.Module):
    """The ``vq`` module: only its codebook is used at inference (its projections are identities)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self._codebook = CosineCodebook(size, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._codebook(tokens)


class CTViTEncoder(nn.Module):
    """A ``(B, 1, T, H, W)`` crop (SLP axes: T along S, 60³ for CT-CLIP) cut into 10 x 20 x 20 patches,
    embedded, encoded spatially (per slab, with the position bias) then temporally (per patch column),
    quantised, and averaged over the 6 x 3 x 3 tokens."""

    def __init__(
        self,
        dim: int = 512,
        codebook_size: int = 8192,
        image_size: int = 60,
        patch_size: int = 20,
        temporal_patch_size: int = 10,
        spatial_depth: int = 4,
        temporal_depth: int = 4,
        dim_head: int = 32,
        heads: int = 8,
    ):
        super().__init__()
        self.image_size = image_size
        self.patch = (temporal_patch_size, patch_size, patch_size)
        patch_values = temporal_patch_size * patch_size * patch_size
        self.spatial_rel_pos_bias = ContinuousPositionBias(dim, heads)
        self.to_patch_emb = nn.Sequential(
            nn.Identity(), nn.LayerNorm(patch_values), nn.Linear(patch_values, dim), nn.LayerNorm(dim)
        )
        self.enc_spatial_transformer = FactorisedTransformer(dim, spatial_depth, dim_head, heads)
        self.enc_temporal_transformer = FactorisedTransformer(dim, temporal_depth, dim_head, heads)
        self.vq = VectorQuantizer(codebook_size, dim)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """``b 1 (t pt) (h p1) (w p2) -> b t h w (pt p1 p2)``."""
        b, c, *sizes = x.shape
        if tuple(sizes[1:]) != (self.image_size, self.image_size) or any(s % p for s, p in zip(sizes, self.patch)):
            raise ValueError(f"CTViT needs {self.image_size}² slices and whole patches, not {tuple(sizes)}")
        (pt, p1, p2), (t, h, w) = self.patch, (s // p for s, p in zip(sizes, self.patch))
        x = x.reshape(b, c, t, pt, h, p1, w, p2).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, t, h, w, c * pt * p1 * p2)

    def encoded_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The quantised tokens, ``(b, t, h, w, dim)``, as ``CTViT(..., return_encoded_tokens=True)``."""
        tokens = self.to_patch_emb(self.patches(x))
        b, t, h, w, d = tokens.shape
        shape = (b, t, h, w)
        tokens = self.enc_spatial_transformer(
            tokens.reshape(b * t, h * w, d), shape, self.spatial_rel_pos_bias(h, w)
        ).reshape(b, t, h, w, d)
        tokens = tokens.permute(0, 2, 3, 1, 4).reshape(b * h * w, t, d)
        tokens = self.enc_temporal_transformer(tokens, shape).reshape(b, h, w, t, d).permute(0, 3, 1, 2, 4)
        return self.vq(tokens.reshape(b, t * h * w, d)).reshape(b, t, h, w, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoded_tokens(x).mean(dim=(1, 2, 3))
