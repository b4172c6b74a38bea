"""Convert an image collection into shuffled webdataset shards that data.shards reads.

    python scripts/make_shards.py SRC OUT [--samples-per-shard 10000] [--prefix train] [--workers 8] [--seed 0]
    python scripts/make_shards.py --verify OUT [--decode]

SRC is either an ImageFolder tree (`SRC/<class>/<image>.JPEG`) or a folder of per-class tar files, the way
ImageNet-22K is distributed (`SRC/n01440764.tar`, ...). Classes are indexed in sorted name order; the map is
OUT/classes.txt (line i = class i). Samples are shuffled over the whole collection (seeded), then cut into
OUT/<prefix>-000000.tar, ... holding `<key>.<jpg|png|webp>` (the original bytes, not re-encoded), `<key>.cls`
and `<key>.json` (class name and source). OUT/<prefix>.txt lists the shards for the loader, and
OUT/<prefix>-manifest.json records shards, sample counts and classes.

Safe restart: each shard is written to a temporary name and renamed when complete; a rerun with the same
arguments over the same source (checked against the plan saved in the manifest's place) writes only the
shards that are missing. --verify re-reads every shard and checks it against the manifest.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}

# The plan is an int64 array with one row per sample: class index, source index, byte offset of the image in
# its tar (-1: a whole file), size, extension index. Sources are image files or per-class tars, so that
# 70M samples in 21841 tars cost ~3 GB of plan and no per-sample strings. Workers get the lists once.
OUT_EXTS = ("jpg", "png", "webp")
_SOURCES: list[str] = []
_CLASSES: list[str] = []


def _ext(name: str) -> int | None:
    """Index into OUT_EXTS of an image file name, None for anything else."""
    ext = IMAGE_EXTS.get(os.path.splitext(name)[1].lower())
    return None if ext is None else OUT_EXTS.index(ext)


def _scan_tar(path: str) -> list[tuple[int, int, int]]:
    """(offset, size, extension) of the image members of one per-class tar, in name order."""
    with tarfile.open(path) as tar:
        members = sorted((m.name, m.offset_data, m.size) for m in tar if m.isreg() and _ext(m.name) is not None)
    return [(offset, size, _ext(name)) for name, offset, size in members]


def scan(src: Path, workers: int):
    """-> class names, sources, plan (see above), in a reproducible order."""
    tars = sorted(p for p in src.iterdir() if p.suffix == ".tar" and p.is_file())
    dirs = sorted(p for p in src.iterdir() if p.is_dir())
    if tars and dirs or not (tars or dirs):
        raise SystemExit(f"{src}: expected either class folders (ImageFolder) or per-class .tar files, found "
                         f"{len(dirs)} folders and {len(tars)} tars")
    classes, sources, rows = [], [], []
    if dirs:
        for c, d in enumerate(dirs):
            classes.append(d.name)
            for f in sorted(p for p in d.rglob("*") if p.is_file() and _ext(p.name) is not None):
                rows.append((c, len(sources), -1, f.stat().st_size, _ext(f.name)))
                sources.append(str(f))
    else:
        with mp.Pool(workers) as pool:
            members = list(tqdm(pool.imap(_scan_tar, map(str, tars)), total=len(tars), desc="scan", unit="tar"))
        for c, (t, mem) in enumerate(zip(tars, members)):
            classes.append(t.stem)
            rows += [(c, c, offset, size, ext) for offset, size, ext in mem]
            sources.append(str(t))
    if not rows:
        raise SystemExit(f"{src}: no .jpg/.jpeg/.png/.webp images found")
    return classes, sources, np.array(rows, dtype=np.int64)


def _read(i: int, offset: int, size: int) -> bytes:
    with open(_SOURCES[i], "rb") as f:
        if offset >= 0:
            f.seek(offset)
        data = f.read(size if offset >= 0 else -1)
    if len(data) != size:
        raise OSError(f"{_SOURCES[i]}: read {len(data)} of {size} bytes at {offset}")
    return data


def _init_worker(sources, classes):
    global _SOURCES, _CLASSES
    _SOURCES, _CLASSES = sources, classes


def _write_shard(job) -> tuple[str, int]:
    path, first_key, rows = job
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w") as tar:
        for k, (c, s, offset, size, ext) in enumerate(rows):
            key = f"{first_key + k:09d}"
            source = os.path.basename(_SOURCES[s]) + (f"@{offset}" if offset >= 0 else "")
            meta = json.dumps(dict(class_name=_CLASSES[c], source=source)).encode()
            for suffix, data in ((OUT_EXTS[ext], _read(s, offset, size)), ("cls", str(c).encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)  # complete shards only ever appear under their final name
    return os.path.basename(path), len(rows)


def make_shards(src: Path, out: Path, *, samples_per_shard: int, prefix: str, workers: int, seed: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    classes, sources, plan = scan(src, workers)
    plan = plan[np.random.default_rng(seed).permutation(len(plan))]
    digest = hashlib.sha256(plan.tobytes() + "\n".join(sources).encode()).hexdigest()
    args = dict(source=str(src.resolve()), samples_per_shard=samples_per_shard, seed=seed, plan_sha256=digest)
    plan_path = out / f"{prefix}-plan.json"
    if plan_path.exists() and json.loads(plan_path.read_text()) != args:
        raise SystemExit(f"{plan_path} was made for other arguments or another source: use an empty OUT folder")
    plan_path.write_text(json.dumps(args, indent=1))

    n_shards = -(-len(plan) // samples_per_shard)
    names = [f"{prefix}-{i:06d}.tar" for i in range(n_shards)]
    todo = [(str(out / names[i]), i * samples_per_shard, plan[i * samples_per_shard:(i + 1) * samples_per_shard])
            for i in range(n_shards) if not (out / names[i]).exists()]
    with mp.Pool(workers, initializer=_init_worker, initargs=(sources, classes)) as pool:
        for _ in tqdm(pool.imap_unordered(_write_shard, todo), total=n_shards, initial=n_shards - len(todo),
                      desc="shards", unit="shard"):
            pass

    (out / "classes.txt").write_text("".join(c + "\n" for c in classes))
    (out / f"{prefix}.txt").write_text("".join(n + "\n" for n in names))
    counts = [min(samples_per_shard, len(plan) - i * samples_per_shard) for i in range(n_shards)]
    manifest = dict(args, classes=classes, num_classes=len(classes), samples=len(plan),
                    pattern=f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar", list=f"{prefix}.txt",
                    shards=[dict(name=n, samples=c) for n, c in zip(names, counts)])
    (out / f"{prefix}-manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _verify_shard(job) -> list[str]:
    path, expected, num_classes, decode = job
    problems, keys = [], {}
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                keys.setdefault(key, {})[ext] = tar.extractfile(m).read()
    except (OSError, tarfile.TarError) as exn:
        return [f"{path}: unreadable ({exn})"]
    if len(keys) != expected:
        problems.append(f"{path}: {len(keys)} samples, manifest says {expected}")
    for key, sample in keys.items():
        images = [e for e in sample if e in ("jpg", "jpeg", "png", "webp")]
        label = sample.get("cls", b"").decode(errors="replace").strip()
        if len(images) != 1:
            problems.append(f"{path}: sample {key} has {len(images)} images")
        if not label.isdigit() or int(label) >= num_classes:
            problems.append(f"{path}: sample {key} has label {label!r}, expected 0..{num_classes - 1}")
        if decode and len(images) == 1:
            from PIL import Image
            try:
                Image.open(io.BytesIO(sample[images[0]])).load()
            except Exception as exn:
                problems.append(f"{path}: sample {key} does not decode ({exn})")
    return problems


def verify(out: Path, *, prefix: str, workers: int, decode: bool) -> list[str]:
    manifest = json.loads((out / f"{prefix}-manifest.json").read_text())
    jobs = [(str(out / s["name"]), s["samples"], manifest["num_classes"], decode) for s in manifest["shards"]]
    problems = []
    with mp.Pool(workers) as pool:
        for found in tqdm(pool.imap(_verify_shard, jobs), total=len(jobs), desc="verify", unit="shard"):
            problems += found
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="SRC OUT, or OUT with --verify")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--prefix", default="train")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", action="store_true", help="check OUT's shards against its manifest")
    p.add_argument("--decode", action="store_true", help="with --verify: also decode every image")
    a = p.parse_args(argv)
    if a.verify:
        problems = verify(Path(a.paths[-1]), prefix=a.prefix, workers=a.workers, decode=a.decode)
        print("\n".join(problems) or "all shards match the manifest")
        return 1 if problems else 0
    if len(a.paths) != 2:
        p.error("expected SRC OUT")
    m = make_shards(Path(a.paths[0]), Path(a.paths[1]), samples_per_shard=a.samples_per_shard,
                    prefix=a.prefix, workers=a.workers, seed=a.seed)
    print(f"{m['samples']} samples of {m['num_classes']} classes in {len(m['shards'])} shards: "
          f"{a.paths[1]}/{m['pattern']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
