"""SimMIM (arXiv 2111.09886) around SwinV2, with the official `encoder.` / `decoder.` state-dict names."""
import torch
import torch.nn.functional as F
from torch import nn

from models.swinv2 import SwinTransformerV2, feature_map_sides, holds_values, init_module


class SwinTransformerV2ForSimMIM(SwinTransformerV2):
    """SwinV2 without a head whose masked patch embeddings are replaced by a learnable `mask_token`."""

    def __init__(self, **kwargs):
        with torch.random.fork_rng(devices=[]):
            super().__init__(**kwargs)
        self.mask_token = nn.Parameter(torch.empty(1, 1, self.patch_embed.proj.out_channels,
                                                   device=self.norm.weight.device))
        if holds_values(self.norm.weight):  # mask_token itself is not partitioned yet under zero.Init
            self.init_weights()

    def layer_ids(self) -> dict[str, int]:
        return {**super().layer_ids(), "mask_token": 0}  # with the patch embedding it replaces

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W), mask (B, H/p, W/p) with 1 = masked -> features (B, C_last, H/32, W/32)."""
        x = self.patch_embed(image)  # (B, L, C)
        w = mask.flatten(1).unsqueeze(-1).to(x.dtype)
        x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
        x = self.forward_tokens(x)
        side = feature_map_sides(self.img_size, self.patch_size, len(self.layers))[-1]
        return x.transpose(1, 2).reshape(x.shape[0], -1, side, side)


def _box_mean(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean over each pixel's patch x patch neighbourhood with zero padding (avg_pool2d with
    count_include_pad=True), from cumulative sums: O(1) per pixel instead of O(patch^2)."""
    pad = patch // 2
    c = F.pad(x, (pad + 1, pad)).cumsum(-1)
    x = c[..., patch:] - c[..., :-patch]
    c = F.pad(x, (0, 0, pad + 1, pad)).cumsum(-2)
    return (c[..., patch:, :] - c[..., :-patch, :]) / (patch * patch)


def local_mean_std(x: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel and channel, the mean and the std (unbiased variance + 1e-6, square-rooted) of its patch x patch
    neighbourhood inside the image: what the official SimMIM target for SwinV2 divides out."""
    if patch % 2 != 1:
        raise ValueError(f"norm_target_patch must be odd, got {patch}")
    # centred per image and channel, the float32 running sums stay small and exact enough
    centre = x.float().mean(dim=(-2, -1), keepdim=True)
    x = x.float() - centre
    valid = _box_mean(torch.ones_like(x[:1, :1]), patch)  # fraction of the window inside the image
    mean = _box_mean(x, patch) / valid
    mean_sq = _box_mean(x * x, patch) / valid
    count = valid * patch * patch
    var = ((mean_sq - mean * mean) * (count / (count - 1))).clamp(min=0.0)
    return mean + centre, (var + 1e-6).sqrt()


def norm_targets(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Each pixel normalised by its neighbourhood's mean and std (`local_mean_std`)."""
    mean, std = local_mean_std(x, patch)
    return (x.float() - mean) / std


class SimMIM(nn.Module):
    def __init__(self, encoder_stride: int = 32, norm_target: bool = True, norm_target_patch: int = 47,
                 **swinv2_kwargs):
        super().__init__()
        if swinv2_kwargs.pop("num_classes", 0):
            raise ValueError("SimMIM's encoder has no head: num_classes must be 0")
        if norm_target and norm_target_patch % 2 != 1:
            raise ValueError(f"norm_target_patch must be odd, got {norm_target_patch}")
        self.encoder_stride = encoder_stride
        self.norm_target = norm_target
        self.norm_target_patch = norm_target_patch
        with torch.random.fork_rng(devices=[]):
            self.encoder = SwinTransformerV2ForSimMIM(num_classes=0, **swinv2_kwargs)
            self.decoder = nn.Sequential(
                nn.Conv2d(self.encoder.num_features, encoder_stride ** 2 * 3, kernel_size=1),
                nn.PixelShuffle(encoder_stride))
        if holds_values(self.encoder.mask_token):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        self.encoder.init_weights()
        self.decoder[0].reset_parameters()

    init_module = staticmethod(init_module)

    def init_buffers(self):
        self.encoder.init_buffers()

    def blocks(self) -> list[nn.Module]:
        return self.encoder.blocks()

    def layer_ids(self) -> dict[str, int]:
        """The encoder's ids (see SwinTransformerV2.layer_ids); the decoder is in the last layer."""
        encoder = {f"encoder.{name}": i for name, i in self.encoder.layer_ids().items()}
        last = max(encoder.values())
        return {name: encoder.get(name, last) for name, _ in self.named_parameters()}

    def set_grad_checkpointing(self, mode: str = "torch"):
        self.encoder.set_grad_checkpointing(mode)

    def no_weight_decay_keywords(self) -> set[str]:
        return self.encoder.no_weight_decay_keywords() | {"mask_token"}

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> dict:
        """image (B, 3, H, W) normalised, mask (B, H/p, W/p) 0/1 -> dict(loss, reconstruction)."""
        p = self.encoder.patch_size
        expected = (image.shape[0], image.shape[2] // p, image.shape[3] // p)
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask must have shape {expected} for images {tuple(image.shape)}, "
                             f"got {tuple(mask.shape)}")
        reconstruction = self.decoder(self.encoder(image, mask)).float()
        target = image.float()
        if self.norm_target:
            target = norm_targets(target, self.norm_target_patch)
        pixel_mask = mask.float().repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)
        loss = (F.l1_loss(reconstruction, target, reduction="none") * pixel_mask).sum()
        loss = loss / (pixel_mask.sum() + 1e-5) / image.shape[1]
        return dict(loss=loss, reconstruction=reconstruction)


def encoder_state_dict(simmim_state_dict: dict) -> dict:
    """The bare encoder weights of a SimMIM state dict (no decoder, no mask token), official key names."""
    return {k[len("encoder."):]: v for k, v in simmim_state_dict.items()
            if k.startswith("encoder.") and k != "encoder.mask_token"}
