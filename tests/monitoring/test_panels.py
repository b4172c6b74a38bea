"""SimMIM reconstruction panels: input | masked input | reconstruction, in pixels."""

import numpy as np
import torch

from pretrain.objectives import norm_targets, simmim_panel

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 64


def normalised_image() -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    pixels = torch.stack([rows, cols, torch.full_like(rows, 0.5)])
    return (pixels - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def checkerboard_mask() -> torch.Tensor:  # (H/4, W/4), 1 = masked
    mask = torch.zeros(SIZE // 4, SIZE // 4)
    mask[::2, ::2] = 1
    return mask


def split(panel: np.ndarray) -> list[np.ndarray]:
    gap = (panel.shape[1] - 3 * SIZE) // 2
    return [panel[:, i * (SIZE + gap): i * (SIZE + gap) + SIZE] for i in range(3)]


def test_panel_is_three_uint8_pictures_side_by_side():
    image = normalised_image()
    panel = simmim_panel(image, checkerboard_mask(), torch.zeros_like(image), MEAN, STD)
    assert panel.dtype == np.uint8 and panel.shape[0] == SIZE and panel.shape[2] == 3
    original, masked, _ = split(panel)
    assert abs(int(original[0, -1, 1]) - 255) <= 1  # green ramps to full along the width: denormalised
    assert (masked[:4, :4] == 0).all() and (masked[:4, 4:8] == original[:4, 4:8]).all()


def test_a_perfect_reconstruction_shows_the_input():
    image = normalised_image()
    original, _, reconstruction = split(simmim_panel(image, checkerboard_mask(), image, MEAN, STD))
    assert np.array_equal(original, reconstruction)


def test_norm_target_predictions_get_the_local_statistics_back():
    image = normalised_image()
    target = norm_targets(image[None], 47)[0]  # what SimMIM with norm_target learns to predict
    panel = simmim_panel(image, checkerboard_mask(), target, MEAN, STD, norm_target_patch=47)
    original, _, reconstruction = split(panel)
    assert np.abs(original.astype(int) - reconstruction).max() <= 1
