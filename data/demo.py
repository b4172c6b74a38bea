"""Deterministic demo images written as webdataset shards (the embedded default and the tests use them).

Ten classes, one shape each (disk, square, triangle, ring, cross, stripes, ...), drawn in a class colour
at a random place and size over a smooth two-colour gradient with mild noise. A small classifier separates
them in a few hundred steps (shape and colour both carry the class), and masked reconstruction has real
structure to learn (edges, gradients, stripes continue under the mask).

`python -m data.demo [demo.KEY=VALUE ...]` writes the set that conf/data/demo.yaml describes (by default
into ./demo_shards; instant when it is already there).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from data.decode import encode_jpeg

# class c has hue CLASS_HUES[c % 10] and shape SHAPE_NAMES[c % 10]
CLASS_HUES = np.linspace(0.0, 1.0, 10, endpoint=False)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "data"
VERSION = 2  # bump when the images change, so that old demo shards are rewritten


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def _box(x, y):
    return np.maximum(abs(x), abs(y)) < 1


# x, y: coordinates relative to the shape's centre, in units of its radius
SHAPES = {
    "disk": lambda x, y: x * x + y * y < 1,
    "square": lambda x, y: np.maximum(abs(x), abs(y)) < 0.85,
    "triangle": lambda x, y: (y < 0.8) & (y > 1.6 * abs(x) - 0.9),
    "ring": lambda x, y: abs(x * x + y * y - 0.68) < 0.32,
    "cross": lambda x, y: (np.minimum(abs(x), abs(y)) < 0.3) & _box(x, y),
    "hstripes": lambda x, y: _box(x, y) & (np.floor(y * 3) % 2 == 0),
    "vstripes": lambda x, y: _box(x, y) & (np.floor(x * 3) % 2 == 0),
    "checker": lambda x, y: _box(x, y) & ((np.floor(x * 2) + np.floor(y * 2)) % 2 == 0),
    "diamond": lambda x, y: abs(x) + abs(y) < 1,
    "ellipse": lambda x, y: x * x + 4 * y * y < 1,
}
SHAPE_NAMES = list(SHAPES)


def make_image(label: int, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """One HWC uint8 image of class `label`."""
    yy, xx = np.ogrid[0:height, 0:width]
    xx, yy = xx.astype(np.float32), yy.astype(np.float32)
    c0, c1 = rng.uniform(0.1, 0.9, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(angle) + yy * np.sin(angle)  # (H, W) by broadcasting
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    img = c0 + (c1 - c0) * t[..., None]
    radius = rng.uniform(0.22, 0.4) * min(width, height)
    cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
    hue = CLASS_HUES[label % len(CLASS_HUES)] + label // len(CLASS_HUES) * 0.05 + rng.normal(0, 0.02)
    colour = _hsv_to_rgb(hue % 1.0, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0))
    img[SHAPES[SHAPE_NAMES[label % len(SHAPES)]]((xx - cx) / radius, (yy - cy) / radius)] = colour
    img += rng.random(img.shape, dtype=np.float32) * 0.08 - 0.04
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _write_split(out_dir: str, split: str, count: int, per_shard: int, num_classes: int, size, seed: int):
    import webdataset as wds  # imports torch: only paid when shards are written

    width, height = size
    shards = []
    for s, start in enumerate(range(0, count, per_shard)):
        name = f"{split}-{s:06d}.tar"
        tmp = os.path.join(out_dir, name + ".tmp")
        with wds.TarWriter(tmp) as sink:
            for i in range(start, min(start + per_shard, count)):
                rng = np.random.default_rng([seed, split == "val", i])
                label = int(rng.integers(num_classes))
                sink.write({"__key__": f"{split}{i:08d}", "jpg": encode_jpeg(make_image(label, rng, width, height)),
                            "cls": str(label).encode()})
        os.replace(tmp, os.path.join(out_dir, name))  # a shard is either whole or absent
        shards.append(dict(name=name, samples=min(per_shard, count - start)))
    with open(os.path.join(out_dir, f"{split}.txt"), "w") as f:  # shard list, relative to its folder
        f.writelines(s["name"] + "\n" for s in shards)
    return dict(list=f"{split}.txt", pattern=f"{split}-{{000000..{len(shards) - 1:06d}}}.tar", shards=shards,
                samples=count)


def write_demo_shards(out_dir: str, *, num_classes: int, train_samples: int, val_samples: int,
                      samples_per_shard: int, image_size, seed: int) -> dict:
    """Write train-*.tar, val-*.tar, their shard lists train.txt, val.txt and manifest.json into out_dir;
    returns the manifest.

    `image_size` is (width, height) or one int for square images. Nothing is written when out_dir already
    holds a manifest for the same arguments.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(v) for v in image_size)
    args = dict(num_classes=num_classes, train_samples=train_samples, val_samples=val_samples,
                samples_per_shard=samples_per_shard, image_size=list(size), seed=seed, version=VERSION)
    path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(path):
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("args") == args:
            return manifest
    os.makedirs(out_dir, exist_ok=True)
    manifest = dict(args=args, classes=[SHAPE_NAMES[c % len(SHAPES)] + (f"_{c // len(SHAPES)}" if c >= len(SHAPES)
                                                                          else "") for c in range(num_classes)])
    for split, count in (("train", train_samples), ("val", val_samples)):
        manifest[split] = _write_split(out_dir, split, count, samples_per_shard, num_classes, size, seed)
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(path + ".tmp", path)  # the manifest is written last: it marks a complete set
    return manifest


def main(overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        demo = dict(compose(config_name="demo", overrides=overrides).demo)
    out_dir = demo.pop("out_dir")
    manifest = write_demo_shards(out_dir, **demo)
    print(f"demo shards in {out_dir}: {manifest['train']['samples']} train samples in "
          f"{len(manifest['train']['shards'])} shards, {manifest['val']['samples']} val samples in "
          f"{len(manifest['val']['shards'])} shards")


if __name__ == "__main__":
    main(sys.argv[1:])
