import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing

from data.decode import decode_crop_resize, encode_jpeg
from data.demo import make_image
from data.transforms import (EvalTransform, MaskGenerator, MixupCutmix, SimMIMTransform, SupervisedTransform,
                             center_box, posterize_to_zero_bits, random_resized_box)


def jpeg(width=500, height=375, seed=0) -> bytes:
    return encode_jpeg(make_image(3, np.random.default_rng(seed), width, height))


def test_mask_generator_masks_22_of_36_patches_at_model_patch_resolution():
    torch.manual_seed(0)
    mask = MaskGenerator(input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)()
    assert mask.shape == (48, 48)
    assert set(mask.unique().tolist()) == {0, 1}
    coarse = mask[::8, ::8]
    assert coarse.sum() == 22
    assert torch.equal(mask, coarse.repeat_interleave(8, 0).repeat_interleave(8, 1))


def test_mask_generator_rejects_sizes_that_do_not_tile():
    with pytest.raises(ValueError, match="multiple of mask_patch_size"):
        MaskGenerator(input_size=100, mask_patch_size=32)


def test_random_resized_box_respects_scale_and_ratio():
    torch.manual_seed(0)
    for _ in range(200):
        l, t, r, b = random_resized_box(500, 375, (0.67, 1.0), (3 / 4, 4 / 3))
        w, h = r - l, b - t
        assert 0 <= l and 0 <= t and r <= 500 and b <= 375
        assert 0.67 * 500 * 375 * 0.97 <= w * h <= 500 * 375
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03


def test_simmim_transform_gives_normalised_image_and_mask():
    torch.manual_seed(0)
    out = SimMIMTransform(img_size=192)(jpeg())
    assert out["image"].shape == (3, 192, 192) and out["image"].dtype == torch.float32
    assert out["mask"].shape == (48, 48) and out["mask"][::8, ::8].sum() == 22
    # normalised: the demo image's values span roughly [-2, 2.6]
    assert -2.2 < out["image"].min() < 0 < out["image"].max() < 2.7


def seed_all(n: int) -> None:
    """The loader seeds these three per batch: torch (crop, flip), Python and numpy (timm)."""
    torch.manual_seed(n)
    random.seed(n)
    np.random.seed(n)


def test_transforms_replay_under_the_same_seed():
    tf = SupervisedTransform(img_size=96, rand_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    data = jpeg()
    images = []
    for n in (5, 5, 6):
        seed_all(n)
        images.append(tf(data)["image"])
    assert torch.equal(images[0], images[1]) and not torch.equal(images[0], images[2])


def test_supervised_augmentation_is_the_official_timm_recipe():
    """The official fine-tuning transform is timm's create_transform with these arguments: its RandAugment
    ops (each with its probability, magnitude, noise and fill) and its RandomErasing are ours."""
    official = create_transform(192, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                                re_mode="pixel", re_count=1, interpolation="bicubic")
    ra = next(t for t in official.transforms if isinstance(t, RandAugment))
    erase = next(t for t in official.transforms if isinstance(t, RandomErasing))
    ours = SupervisedTransform(img_size=192, rand_augment="rand-m9-mstd0.5-inc1", reprob=0.25)

    def ops(r):
        return [(o.name, o.prob, o.magnitude, o.magnitude_std, o.magnitude_max, o.kwargs, o.hparams) for o in r.ops]

    posterize_to_zero_bits(ra)
    assert ops(ours.randaug) == ops(ra) and ours.randaug.num_layers == ra.num_layers == 2
    assert {o.name for o in ra.ops} >= {"SolarizeIncreasing", "PosterizeIncreasing", "TranslateXRel", "SolarizeAdd"}
    assert ra.ops[0].prob == 0.5 and ra.ops[0].magnitude_std == 0.5
    assert vars(ours.erase) == vars(erase)
    # same draws, same picture: op choice (numpy), probabilities and magnitudes (Python's random)
    img = Image.fromarray(make_image(2, np.random.default_rng(0), 192, 192))
    outs = []
    for r in (ours.randaug, ra):
        seed_all(3)
        outs.append(np.array(r(img)))
    assert np.array_equal(*outs)


def test_posterize_to_zero_bits_gives_black_instead_of_dropping_the_sample():
    ra = SupervisedTransform(rand_augment="rand-m9-mstd0.5-inc1").randaug
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    img = Image.fromarray(make_image(2, np.random.default_rng(0), 32, 32))
    assert np.array(op.aug_fn(img, 0)).max() == 0  # level 10: timm asks for 0 bits
    assert np.array_equal(np.array(op.aug_fn(img, 2)), np.array(img) & 0xC0)


def test_rand_augment_spec_is_checked():
    with pytest.raises(ValueError, match="'rand-m9-x3': not a timm RandAugment spec"):
        SupervisedTransform(rand_augment="rand-m9-x3")
    assert SupervisedTransform(rand_augment="").randaug is None
    ra = SupervisedTransform(rand_augment="rand-n3-m7-mstd0.5").randaug
    assert ra.num_layers == 3 and {(o.magnitude, o.magnitude_std) for o in ra.ops} == {(7, 0.5)}


def test_eval_transform_is_deterministic_center_crop():
    tf = EvalTransform(img_size=64, crop_pct=0.875)
    data = jpeg()
    assert torch.equal(tf(data)["image"], tf(data)["image"])
    assert center_box(500, 375, 0.875) == pytest.approx((85.9375, 23.4375, 414.0625, 351.5625))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_fast_and_pillow_paths_agree(fmt):
    """Pillow decodes PNG/WebP; JPEG goes through simplejpeg with draft-mode downscaling (source 4x the crop)."""
    rgb = make_image(4, np.random.default_rng(1), 512, 384)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, quality=95)
    box = lambda w, h: (0, 0, w, h)  # noqa: E731 - whole image, 4x larger than the output
    fast = decode_crop_resize(buf.getvalue(), box, (128, 96), decoder="simplejpeg")
    assert fast.shape == (3, 96, 128) and fast.dtype == torch.uint8
    fast = fast.permute(1, 2, 0).numpy().astype(np.float32)
    ref = np.asarray(Image.fromarray(rgb).resize((128, 96), Image.BILINEAR), np.float32)
    assert np.abs(fast - ref).mean() < 3.0


def test_draft_mode_decodes_large_jpegs_at_reduced_scale(monkeypatch):
    import simplejpeg

    from data import decode

    sizes = []
    real = simplejpeg.decode_jpeg
    monkeypatch.setattr(decode.simplejpeg, "decode_jpeg", lambda *a, **k: sizes.append(real(*a, **k).shape)
                        or real(*a, **k))
    data = jpeg(800, 600)
    decode_crop_resize(data, lambda w, h: (0, 0, w, h), (192, 192))  # 3.1x: decoded at 1/2
    decode_crop_resize(data, lambda w, h: (0, 0, 300, 300), (192, 192))  # 1.6x: full size
    assert sizes == [(300, 400, 3), (600, 800, 3)]


def test_crop_resize_matches_pillow_on_the_box():
    rgb = make_image(2, np.random.default_rng(2), 500, 375)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    for interpolation, resample in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
        ours = decode_crop_resize(buf.getvalue(), lambda w, h: (40, 30, 400, 350), (192, 192),
                                  interpolation=interpolation).permute(1, 2, 0).numpy().astype(np.float32)
        ref = np.asarray(Image.fromarray(rgb).resize((192, 192), resample, box=(40, 30, 400, 350)), np.float32)
        assert np.abs(ours - ref).mean() < 0.1


def test_unknown_decoder_is_rejected_up_front():
    with pytest.raises(ValueError, match="decoder 'turbo'"):
        SimMIMTransform(decoder="turbo")
    with pytest.raises(ValueError, match="decoder 'turbo'"):
        EvalTransform(decoder="turbo")


def test_pillow_decoder_gives_the_same_crop():
    data = jpeg()
    torch.manual_seed(1)
    fast = SimMIMTransform(img_size=96, decoder="simplejpeg")(data)["image"]
    torch.manual_seed(1)
    slow = SimMIMTransform(img_size=96, decoder="pillow")(data)["image"]
    assert (fast - slow).abs().mean() < 0.05  # same crop and flip; the two libjpeg builds differ by rounding


def test_undecodable_bytes_raise():
    with pytest.raises(Exception):
        SimMIMTransform()(b"\xff\xd8 not a jpeg")


def test_mixup_cutmix_targets_are_smoothed_distributions():
    seed_all(0)
    samples = [dict(image=torch.randn(3, 32, 32), label=torch.tensor(i % 5)) for i in range(8)]
    batch = MixupCutmix(num_classes=5, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)(samples)
    assert batch["image"].shape == (8, 3, 32, 32) and batch["target"].shape == (8, 5)
    assert torch.allclose(batch["target"].sum(1), torch.ones(8))
    assert batch["target"].min() >= 0.1 / 5 - 1e-6
    assert not torch.equal(batch["image"], torch.stack([s["image"] for s in samples]))  # images were mixed
    plain = MixupCutmix(num_classes=5, mixup_alpha=0, cutmix_alpha=0, label_smoothing=0.1)(samples)
    assert plain["target"][0].tolist() == pytest.approx([0.9 + 0.02, 0.02, 0.02, 0.02, 0.02])
