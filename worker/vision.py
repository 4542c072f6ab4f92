"""Idefics3 / SmolVLM vision tower: a SigLIP encoder and the pixel-shuffle connector, in plain torch.

gpt-fast's shape, with Hugging Face weight names (`model.vision_model.*`, `model.connector.*`):
- patch embedding: a conv of kernel = stride = patch_size, plus a learned position embedding per
  patch (tiles are always full size here, so Idefics3's bucketed positions are simply 0..P-1);
- `num_hidden_layers` pre-norm blocks: LayerNorm, bidirectional multi-head attention (q/k/v/out
  with bias), LayerNorm, fc1 -> GELU (tanh) -> fc2; then `post_layernorm`;
- connector: pixel shuffle by `scale_factor` (a P = s x s patch grid becomes (s/f)^2 tokens of
  f^2 x hidden size), then a bias-free projection to the language model's hidden size.
`VisionTower.encode(pixel_values [n_tiles, 3, S, S])` returns [n_tiles * image_seq_len, text dim]:
what the language model reads at the image's placeholder positions, tile by tile, in prompt order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from worker.config import ConfigError
from worker.model import embedding


@dataclass(frozen=True)
class VisionArgs:
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    image_size: int
    patch_size: int
    scale_factor: int
    text_dim: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "VisionArgs":
        v = cfg["vision_config"]
        act = v.get("hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_new"):
            raise ConfigError(f"vision_config.hidden_act {act!r} is not supported (only gelu_pytorch_tanh)")
        args = cls(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                   n_layers=v["num_hidden_layers"], n_heads=v["num_attention_heads"], image_size=v["image_size"],
                   patch_size=v["patch_size"], scale_factor=cfg.get("scale_factor", 2),
                   text_dim=cfg["text_config"]["hidden_size"], num_channels=v.get("num_channels", 3),
                   layer_norm_eps=v.get("layer_norm_eps", 1e-6))
        if args.patches_per_side % args.scale_factor:
            raise ConfigError(f"{args.patches_per_side} patches per side do not divide by scale_factor "
                              f"{args.scale_factor}")
        return args

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def image_seq_len(self) -> int:
        """Tokens per tile after the pixel shuffle."""
        return self.patches_per_side**2 // self.scale_factor**2


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        d = args.hidden_size
        self.n_heads = args.n_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # [tiles, patches, hidden]
        q, k, v = (p(x).view(b, t, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # bidirectional: every patch of a tile sees every other
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class VisionBlock(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        d, eps = args.hidden_size, args.layer_norm_eps
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.self_attn = VisionAttention(args)
        self.fc1, self.fc2 = nn.Linear(d, args.intermediate_size), nn.Linear(args.intermediate_size, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.layer_norm2(x)), approximate="tanh"))


class VisionTower(nn.Module):
    """SigLIP encoder + Idefics3 connector (pixel shuffle and projection)."""

    def __init__(self, args: VisionArgs, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.args, self.dtype = args, dtype
        d = args.hidden_size
        self.patch_embedding = nn.Conv2d(args.num_channels, d, kernel_size=args.patch_size, stride=args.patch_size)
        self.position_embedding = embedding(args.patches_per_side**2, d)
        self.layers = nn.ModuleList(VisionBlock(args) for _ in range(args.n_layers))
        self.post_layernorm = nn.LayerNorm(d, eps=args.layer_norm_eps)
        self.proj = nn.Linear(d * args.scale_factor**2, args.text_dim, bias=False)
        self.to(dtype)

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_tiles, C, S, S] normalized pixels -> [n_tiles * image_seq_len, text_dim] embeddings."""
        a = self.args
        if tuple(pixel_values.shape[1:]) != (a.num_channels, a.image_size, a.image_size):
            raise ValueError(f"tiles must be {a.num_channels}x{a.image_size}x{a.image_size}, "
                             f"got {tuple(pixel_values.shape[1:])}")
        x = self.patch_embedding(pixel_values.to(self.device, self.dtype)).flatten(2).transpose(1, 2)
        x = x + self.position_embedding.weight
        for layer in self.layers:
            x = layer(x)
        return self.proj(self.pixel_shuffle(self.post_layernorm(x))).reshape(-1, a.text_dim)

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s*s, d] -> [b, (s/f)^2, d*f^2], exactly as Idefics3Connector.pixel_shuffle orders it."""
        f, (b, seq, d) = self.args.scale_factor, x.shape
        s = self.args.patches_per_side
        x = x.view(b, s, s // f, d * f).permute(0, 2, 1, 3)
        x = x.reshape(b, s // f, s // f, d * f * f).permute(0, 2, 1, 3)
        return x.reshape(b, seq // (f * f), d * f * f)

    def load_weights(self, weights: dict[str, torch.Tensor], device: torch.device | str) -> None:
        """Load `model.vision_model.*` and `model.connector.*` tensors (Hugging Face names)."""
        own = {}
        for key, value in weights.items():
            k = key.removeprefix("model.")
            k = k.removeprefix("vision_model.").removeprefix("embeddings.").removeprefix("encoder.")
            k = k.replace("connector.modality_projection.", "").replace(".mlp.", ".")
            own[k] = value.to(device=device, dtype=self.dtype)
        self.load_state_dict(own, strict=True, assign=True)
