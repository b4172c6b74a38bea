"""SimMIM (arXiv 2111.09886) around SwinV2, with the official `encoder.` / `decoder.` state-dict names."""
import torch
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


class SimMIM(nn.Module):
    def __init__(self, encoder_stride: int = 32, **swinv2_kwargs):
        super().__init__()
        if swinv2_kwargs.pop("num_classes", 0):
            raise ValueError("SimMIM's encoder has no head: num_classes must be 0")
        self.encoder_stride = encoder_stride
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

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W) normalised, mask (B, H/p, W/p) 0/1 -> reconstruction (B, 3, H, W) float32 (the loss
        is the trainer's: pretrain.objectives.masked_l1)."""
        p = self.encoder.patch_size
        expected = (image.shape[0], image.shape[2] // p, image.shape[3] // p)
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask must have shape {expected} for images {tuple(image.shape)}, "
                             f"got {tuple(mask.shape)}")
        return self.decoder(self.encoder(image, mask)).float()


def encoder_state_dict(simmim_state_dict: dict) -> dict:
    """The bare encoder weights of a SimMIM state dict (no decoder, no mask token), official key names."""
    return {k[len("encoder."):]: v for k, v in simmim_state_dict.items()
            if k.startswith("encoder.") and k != "encoder.mask_token"}
