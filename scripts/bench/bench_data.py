"""Input pipeline benchmarks: decode + augment images/s on one core, ours vs plain Pillow + torchvision.

1. Per-sample decode + augment of 500x375 JPEGs to 192px, in memory, one thread: data.transforms (simplejpeg,
   draft-mode decode, crop before resize) vs the plain pipeline (PIL.Image.open + convert, torchvision v2
   RandomResizedCrop/flip/ToTensor/Normalize on the full image), rounds interleaved, medians. For SimMIM
   (+ mask) and supervised (+ timm's RandAugment rand-m9-mstd0.5-inc1 + random erasing; the baseline is timm's
   create_transform, the official recipe) augmentation; and SimMIM on 1000x750 JPEGs,
   where the crop is at least twice the output and the JPEG is decoded at half scale.
2. One core through webdataset: data.shards.build_loader (num_workers=0: tar reading, shuffle, decode,
   augment, collate) vs webdataset's stock pipeline (WebDataset(...).decode("pil").map(plain transform)
   .batched) over the same shards.

    .venv/bin/python -m scripts.bench.bench_data [--images 256] [--rounds 5]
`run()` returns the rows for the scripts.bench aggregator.
"""
import statistics
import tempfile
import time

import numpy as np
import torch
from torchvision.transforms import v2

from data.decode import encode_jpeg
from data.demo import make_image
from data.shards import build_loader
from data.transforms import (IMAGENET_MEAN, IMAGENET_STD, MaskGenerator, SimMIMTransform, SupervisedTransform,
                             posterize_to_zero_bits)
from scripts.bench import suite_main

SIZE = 192


def photos(n: int, width: int = 500, height: int = 375) -> list[bytes]:
    """JPEGs (quality 90, 4:2:0); the demo generator's noise gives them photo-like sizes (~40 kB at 500x375)."""
    return [encode_jpeg(make_image(i % 10, np.random.default_rng(i), width, height), quality=90) for i in range(n)]


def plain_simmim():
    """The usual SimMIM input pipeline: Pillow decode, torchvision transforms on the whole image, mask."""
    tf = v2.Compose([v2.RandomResizedCrop(SIZE, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3)),
                     v2.RandomHorizontalFlip(), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    mask = MaskGenerator(input_size=SIZE)
    return lambda img: dict(image=tf(img), mask=mask())


def plain_supervised():
    """The official fine-tuning transform: timm's create_transform (torchvision crop/flip on the whole Pillow
    image, timm's RandAugment and RandomErasing), the same augmentation as ours."""
    from timm.data import create_transform

    from timm.data.auto_augment import RandAugment

    tf = create_transform(SIZE, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                          re_mode="pixel", re_count=1, interpolation="bicubic")
    posterize_to_zero_bits(next(t for t in tf.transforms if isinstance(t, RandAugment)))  # Pillow 13: see there
    return lambda img: dict(image=tf(img))


def _pil(data: bytes):
    import io

    from PIL import Image
    return Image.open(io.BytesIO(data)).convert("RGB")


def _each(fn, items, images_per_item: int = 1):
    """A round for `_interleaved`: fn over every item; returns the images done."""
    def round_() -> int:
        for item in items:
            fn(item)
        return len(items) * images_per_item
    return round_


def _interleaved(fns: dict, rounds: int) -> dict:
    """Median images/s of each fn (called with no arguments, returns images done), rounds interleaved."""
    rates = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


def bench_transform(name, ours, plain, data: list[bytes], rounds: int, source: str = "500x375",
                    baseline: str = "Pillow + torchvision v2 on the whole image") -> dict:
    r = _interleaved(dict(ours=_each(ours, data), plain=_each(lambda d: plain(_pil(d)), data)), rounds)
    return dict(name=f"{name} decode+augment {source} JPEG -> {SIZE}px, 1 core (img/s)", ours=r["ours"],
                baseline=r["plain"], ratio=r["ours"] / r["plain"],
                how=f"in memory, {len(data)} images x {rounds} interleaved rounds, medians; ours = data.transforms "
                    f"(simplejpeg; crop, then torch's uint8 antialiased resize; 1/2-scale draft decode only when "
                    f"the crop is >= 2x the output, rare at 500x375), baseline = {baseline}")


def bench_loader(shard_dir: str, n_shards: int, batch: int, batches: int, rounds: int) -> dict:
    import webdataset as wds

    urls = f"{shard_dir}/bench-{{0..{n_shards - 1}}}.tar"
    loader = build_loader(urls, sample_fn=SimMIMTransform(img_size=SIZE), batch_size=batch, rank=0, world_size=1,
                          num_workers=0, shuffle_buffer=batch * 2, resampled=False, samples_per_epoch=batch * 4,
                          seed=0)
    plain = plain_simmim()
    stock = iter(wds.WebDataset(urls, shardshuffle=False, empty_check=False).repeat().shuffle(batch * 2)
                 .decode("pil").map(lambda s: dict(plain(s["jpg"]), label=int(s["cls"]))).batched(batch))

    r = _interleaved(dict(ours=_each(lambda _: next(loader), range(batches), batch),
                          stock=_each(lambda _: next(stock), range(batches), batch)), rounds)
    return dict(name=f"SimMIM webdataset loader, 1 core, batch {batch} (img/s)", ours=r["ours"],
                baseline=r["stock"], ratio=r["ours"] / r["stock"],
                how=f"tar read + shuffle + decode + augment + collate over {n_shards} shards, num_workers=0, "
                    f"{batches} batches x {rounds} interleaved rounds, medians; baseline = "
                    f"wds.WebDataset().decode('pil').map(plain torchvision).batched()")


def run(images: int = 128, rounds: int = 5) -> list[dict]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = photos(images)
    rows = [bench_transform("SimMIM", SimMIMTransform(img_size=SIZE), plain_simmim(), data, rounds),
            bench_transform("supervised", SupervisedTransform(img_size=SIZE), plain_supervised(), data, rounds,
                            baseline="timm's create_transform (the official recipe's augmentation) on the Pillow image"),
            # larger sources (many ImageNet-22K images are): SimMIM crops are >= 2x the output, draft decode
            bench_transform("SimMIM", SimMIMTransform(img_size=SIZE), plain_simmim(), photos(images // 4, 1000, 750),
                            rounds, source="1000x750")]
    with tempfile.TemporaryDirectory() as tmp:
        import webdataset as wds

        per_shard = len(data) // 2
        for s in range(2):
            with wds.TarWriter(f"{tmp}/bench-{s}.tar") as sink:
                for i in range(s * per_shard, (s + 1) * per_shard):
                    sink.write({"__key__": f"{i:06d}", "jpg": data[i], "cls": str(i % 10).encode()})
        rows.append(bench_loader(tmp, 2, batch=32, batches=4, rounds=rounds))
    return rows


if __name__ == "__main__":
    suite_main("data", run, __doc__, images=128, rounds=5)
