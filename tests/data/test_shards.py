import io
import json
import os
import shutil
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from data.decode import encode_jpeg
from data.demo import make_image
from data.shards import build_loader, expand_urls
from data.transforms import EvalTransform, MixupCutmix, SupervisedTransform

PATTERN = "train-{000000..000007}.tar"


def write_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def read_tar(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def loader(urls, **kw):
    args = dict(sample_fn=EvalTransform(img_size=32), batch_size=4, rank=0, world_size=1, num_workers=0,
                shuffle_buffer=10, resampled=False, samples_per_epoch=192, seed=0, num_classes=10)
    return build_loader(str(urls), **{**args, **kw})


def take(ld, n):
    return [next(ld) for _ in range(n)]


def test_urls_from_brace_pattern_and_shard_list(demo_dir):
    shards = expand_urls(str(demo_dir / PATTERN))
    assert [os.path.basename(s) for s in shards] == [f"train-{i:06d}.tar" for i in range(8)]
    assert expand_urls(str(demo_dir / "train.txt")) == shards  # list entries are relative to the list
    assert expand_urls([str(demo_dir / PATTERN), "pipe:cat x.tar"])[-1] == "pipe:cat x.tar"


def test_missing_shard_and_empty_pattern_are_clear_errors(demo_dir):
    with pytest.raises(FileNotFoundError, match=r"2 of 10 shards .* do not exist, first: .*train-000008.tar"):
        loader(demo_dir / "train-{000000..000009}.tar")
    with pytest.raises(ValueError, match="matches no shards"):
        loader("")
    with pytest.raises(FileNotFoundError, match="shard-list file"):
        loader(demo_dir / "nope.txt")


def test_too_few_shards_for_ranks_times_workers_says_how_many(demo_dir):
    with pytest.raises(ValueError, match=r"8 shards .* too few for 3 ranks x 3 workers: at least 9"):
        loader(demo_dir / PATTERN, world_size=3, num_workers=3)
    ld = loader(demo_dir / PATTERN, world_size=3, num_workers=3, resampled=True)  # draws with replacement
    assert ld.batches_per_epoch == 192 // (3 * 4)


def test_batches_and_epochs(demo_dir):
    ld = loader(demo_dir / PATTERN, samples_per_epoch=50)  # 12 batches of 4 per epoch, 2 samples carried on
    assert ld.batches_per_epoch == 12
    batches = take(ld, 30)
    assert ld.epoch == 2 and ld.stats()["samples"] == 120
    assert all(b["image"].shape == (4, 3, 32, 32) and b["label"].dtype == torch.int64 for b in batches)
    # one pass over the 192 samples without replacement: every demo key once in the first 48 batches
    labels = torch.cat([b["label"] for b in batches + take(ld, 18)])
    assert len(labels) == 192 and labels.bincount(minlength=10).min() > 5


def test_shuffle_buffer_mixes_and_seed_changes_order(demo_dir):
    plain = torch.cat([b["label"] for b in take(loader(demo_dir / PATTERN, shuffle_buffer=0), 6)])
    mixed = torch.cat([b["label"] for b in take(loader(demo_dir / PATTERN, shuffle_buffer=48), 6)])
    again = torch.cat([b["label"] for b in take(loader(demo_dir / PATTERN, shuffle_buffer=48), 6)])
    other = torch.cat([b["label"] for b in take(loader(demo_dir / PATTERN, shuffle_buffer=48, seed=1), 6)])
    assert torch.equal(mixed, again) and not torch.equal(mixed, plain) and not torch.equal(mixed, other)


@pytest.mark.parametrize("num_workers,resampled", [(2, False), (2, True), (0, False)])
def test_resume_replays_the_same_batches(demo_dir, num_workers, resampled):
    kw = dict(num_workers=num_workers, resampled=resampled, shuffle_buffer=16)
    ref = take(loader(demo_dir / PATTERN, **kw), 9)
    ld = loader(demo_dir / PATTERN, **kw)
    take(ld, 5)
    state = ld.state_dict()
    resumed = loader(demo_dir / PATTERN, **kw)
    resumed.load_state_dict(state)
    assert resumed.batches == 5
    for a, b in zip(ref[5:], take(resumed, 4)):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_resume_needs_the_same_world_and_workers(demo_dir):
    state = loader(demo_dir / PATTERN, num_workers=2).state_dict()
    with pytest.raises(ValueError, match=r"\(seed, world_size, num_workers\) = \(0, 1, 2\)"):
        loader(demo_dir / PATTERN, num_workers=1).load_state_dict(state)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    img = encode_jpeg(make_image(1, np.random.default_rng(0), 64, 48))
    write_tar(tmp_path / "bad.tar", {
        "a.jpg": b"\xff\xd8garbage", "a.cls": b"1",  # undecodable image
        "b.jpg": img, "b.cls": b"one",  # non-integer label
        "c.jpg": img,  # no label
        "d.jpg": img, "d.cls": b"12",  # label out of range (10 classes)
        "z.jpg": b"", "z.cls": b"3",  # zero-byte image
        "e.png": img, "e.cls": b"2", "e.pyd": b"\x80\x04K\x01.",  # a pickle member is never read
    })
    ld = loader(tmp_path / "bad.tar", batch_size=1, shuffle_buffer=0)
    batch = next(ld)  # the only good sample comes after the five bad ones
    assert batch["label"].tolist() == [2] and set(batch) == {"image", "label"}
    stats = ld.stats()
    assert (stats["bad_image"], stats["bad_label"], stats["skipped_samples"], stats["samples"]) == (2, 3, 5, 1)
    next(ld)  # the stream goes round again: everything counted again
    assert ld.stats()["skipped_samples"] == 10


def test_truncated_tar_is_counted_and_its_readable_part_used(demo_dir, tmp_path):
    data = (demo_dir / "train-000002.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])  # cut mid-member
    ld = loader(tmp_path / "cut.tar", batch_size=1, shuffle_buffer=0)
    images = [next(ld)["image"] for _ in range(30)]  # 24 whole samples exist: several passes
    per_pass = next(i for i in range(1, 30) if torch.equal(images[i], images[0]))
    assert 5 < per_pass < 24
    assert all(torch.equal(a, b) for a, b in zip(images[:per_pass], images[per_pass:2 * per_pass]))
    assert ld.stats()["shard_errors"] >= 2


def test_a_stream_with_no_readable_sample_fails_instead_of_hanging(tmp_path):
    for i in range(2):
        (tmp_path / f"junk-{i}.tar").write_bytes(b"not a tar at all" * 100)
    ld = loader(tmp_path / "junk-{0..1}.tar")
    with pytest.raises(RuntimeError, match="held no readable sample") as err:
        next(ld)
    assert f"{tmp_path}/junk-0.tar, {tmp_path}/junk-1.tar; last error: ReadError" in str(err.value)


def test_a_shard_deleted_while_the_loader_runs_is_skipped_and_counted(demo_dir, tmp_path, caplog):
    for i in range(2):
        shutil.copy(demo_dir / f"train-00000{i}.tar", tmp_path / f"s-{i}.tar")
    ld = loader(tmp_path / "s-{0..1}.tar", shuffle_buffer=0)
    take(ld, 1)
    (tmp_path / "s-1.tar").unlink()
    labels = torch.cat([b["label"] for b in take(ld, 30)])  # 5 passes over what is left: no end, no error
    assert len(labels) == 120 and ld.stats()["shard_errors"] >= 4
    assert f"shard {tmp_path}/s-1.tar: read failed after 0 samples" in caplog.text and "FileNotFoundError" in caplog.text


@pytest.fixture
def http_root(tmp_path):
    """An HTTP server on localhost serving tmp_path/www: (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_urls_that_fail_or_404_are_skipped_and_counted(demo_dir, http_root):
    root, base = http_root
    shutil.copy(demo_dir / "train-000000.tar", root / "good.tar")
    urls = [f"{base}/good.tar", f"{base}/gone.tar", "pipe:cat /nonexistent/shard.tar"]  # curl exits 22, cat 1
    ld = build_loader(urls, sample_fn=EvalTransform(img_size=32), batch_size=8, rank=0, world_size=1,
                      num_workers=0, shuffle_buffer=0, resampled=False, samples_per_epoch=24, seed=0)
    assert sum(len(next(ld)["label"]) for _ in range(9)) == 72  # three passes over the one good shard
    assert ld.stats()["shard_errors"] >= 4


def test_a_stream_of_only_unusable_samples_fails_instead_of_hanging(tmp_path, monkeypatch):
    import data.shards

    monkeypatch.setattr(data.shards, "MAX_BAD_RUN", 5)
    write_tar(tmp_path / "labels-missing.tar", {f"{i}.jpg": b"\xff\xd8" for i in range(3)})
    with pytest.raises(RuntimeError, match=r"5 samples in a row were unusable .*labels-missing.tar"):
        next(loader(tmp_path / "labels-missing.tar"))


def test_pipe_urls_are_opened_by_webdataset(demo_dir):
    urls = [f"pipe:cat {demo_dir}/train-{i:06d}.tar" for i in range(2)]
    ld = build_loader(urls, sample_fn=EvalTransform(img_size=32), batch_size=8, rank=0, world_size=1,
                      num_workers=0, shuffle_buffer=0, resampled=False, samples_per_epoch=48, seed=0)
    assert sum(len(next(ld)["label"]) for _ in range(6)) == 48 and ld.stats()["shard_errors"] == 0


def test_ranks_with_unequal_shares_yield_the_same_batches_from_disjoint_shards(demo_dir):
    # 5 shards over 2 ranks: rank 0 reads 3 per pass, rank 1 reads 2, yet both go on forever
    ranks = [loader(demo_dir / "train-{000000..000004}.tar", rank=r, world_size=2, shuffle_buffer=0,
                    samples_per_epoch=120) for r in range(2)]
    assert [r.batches_per_epoch for r in ranks] == [15, 15]
    seen = [{tuple(img.flatten()[:64].tolist()) for _ in range(12) for img in next(r)["image"]} for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 48 and not seen[0] & seen[1]
    assert len(take(ranks[1], 30)) == 30  # well past rank 1's 48 samples per pass


def foreign_shard(path, labels: list, fmt: str = "jpeg", members=("json",)):
    """A shard as another tool writes it with Python's tarfile: key.jpeg/key.png, and key.json or key.cls."""
    rng = np.random.default_rng(len(labels))
    files = {}
    for i, label in enumerate(labels):
        rgb = make_image(i % 10, rng, 64, 48)
        if fmt == "png":
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="PNG")
            files[f"s{i:04d}.png"] = buf.getvalue()
        else:
            files[f"s{i:04d}.{fmt}"] = encode_jpeg(rgb)
        if "json" in members:
            files[f"s{i:04d}.json"] = json.dumps({"label": label, "caption": "a photo"}).encode()
        if "cls" in members:
            files[f"s{i:04d}.cls"] = str(label).encode()
    write_tar(path, files)


def test_labels_come_from_cls_or_a_json_key_and_a_sample_without_one_is_bad(tmp_path, monkeypatch):
    import data.shards

    monkeypatch.setattr(data.shards, "MAX_BAD_RUN", 12)
    foreign_shard(tmp_path / "a.tar", [3, 1, "dog", 2.5, None, 7], fmt="png")
    write_tar(tmp_path / "b.tar", {**read_tar(tmp_path / "a.tar"), "x.jpeg": encode_jpeg(np.zeros((8, 8, 3), np.uint8)),
                                   "x.cls": b"4", "x.json": b'{"label": 9}'})  # .cls wins over .json
    ld = loader(tmp_path / "a.tar", batch_size=3, shuffle_buffer=0)
    assert next(ld)["label"].tolist() == [3, 1, 7]
    assert (ld.stats()["bad_label"], ld.stats()["samples"]) == (3, 3)  # "dog", 2.5 and null are no labels
    assert sorted(next(loader(tmp_path / "b.tar", batch_size=4, shuffle_buffer=0))["label"].tolist()) == [1, 3, 4, 7]
    no_json = loader(tmp_path / "a.tar", batch_size=1, shuffle_buffer=0, label_key="")
    with pytest.raises(RuntimeError, match="12 samples in a row were unusable"):
        next(no_json)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_image_only_shards_serve_a_stage_without_labels(tmp_path, fmt):
    foreign_shard(tmp_path / "bare.tar", [0] * 5, fmt=fmt, members=())
    ld = loader(tmp_path / "bare.tar", batch_size=4, shuffle_buffer=0, labels=False)
    batch = next(ld)
    assert set(batch) == {"image"} and batch["image"].shape == (4, 3, 32, 32)
    assert (ld.stats()["samples"], ld.stats()["skipped_samples"]) == (4, 0)


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (1, 2), (2, 1), (3, 2)])
def test_one_pass_reads_every_sample_exactly_once(tmp_path, world_size, num_workers):
    sizes = [7, 5, 11, 1, 3, 9]  # 36 samples in shards of uneven sizes; batch 4 leaves short last batches
    labels = iter(range(36))
    for s, n in enumerate(sizes):
        foreign_shard(tmp_path / f"v-{s}.tar", [next(labels) % 10 for _ in range(n)], members=("cls",))
    seen = []
    for rank in range(world_size):
        ld = loader(tmp_path / "v-{0..5}.tar", rank=rank, world_size=world_size, num_workers=num_workers,
                    shuffle_buffer=1, samples_per_epoch=16)
        next(ld)  # the never-ending stream's position is kept apart from the pass
        for _ in range(2):  # a second pass reads the same images again
            batches = list(ld.one_pass())
            assert all(1 <= len(b["label"]) <= 4 for b in batches)
            seen.append(torch.cat([b["image"] for b in batches]))
        assert torch.equal(seen[-1], seen[-2])
        assert ld.batches == 1
    images = torch.cat(seen[::2])
    assert len(images) == 36 and len(torch.unique(images.flatten(1), dim=0)) == 36


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_replays_timm_augmentation_and_mixup(demo_dir, num_workers):
    """timm draws from numpy's and Python's RNGs: the loader seeds them per batch too, and gives the main
    process's back."""
    kw = dict(sample_fn=SupervisedTransform(img_size=32, rand_augment="rand-m9-mstd0.5-inc1", reprob=0.25),
              collate_fn=MixupCutmix(num_classes=10), num_workers=num_workers, shuffle_buffer=16)
    np.random.seed(0)
    ref = take(loader(demo_dir / PATTERN, **kw), 6)
    assert np.random.randint(1 << 30) == np.random.RandomState(0).randint(1 << 30)  # numpy's state untouched
    ld = loader(demo_dir / PATTERN, **kw)
    take(ld, 3)
    resumed = loader(demo_dir / PATTERN, **kw)
    resumed.load_state_dict(ld.state_dict())
    np.random.seed(1)  # the main process's RNGs do not matter
    for a, b in zip(ref[3:], take(resumed, 3)):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    assert not torch.equal(ref[0]["target"], torch.nn.functional.one_hot(ref[0]["label"], 10).float())
