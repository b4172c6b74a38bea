"""scripts/transfer_table.py end to end at its smallest: 2 ranks, tiny shards, 2 steps per training stage,
through the real supervised, eval and finetune stages, for both CPB coordinate kinds."""

import pytest
from omegaconf import OmegaConf

from data.demo import write_demo_shards
from scripts.transfer_table import format_table, main, parse_args


@pytest.mark.dist
def test_smallest_table_has_every_row_and_transfers_the_training_windows(tmp_path, capsys):
    shards = tmp_path / "shards"
    write_demo_shards(str(shards), num_classes=10, train_samples=96, val_samples=48, samples_per_shard=24,
                      image_size=(80, 64), seed=0)
    main(["--train", "32/2", "--eval-at", "64/4", "32/4", "--finetune-at", "64/4", "--train-steps", "2",
          "--finetune-steps", "2", "--seeds", "0", "--run-root", str(tmp_path / "runs"), "--",
          f"data.train_urls={shards}/train.txt", f"data.val_urls={shards}/val.txt", "data.samples_per_epoch=96",
          "data.val_samples=48", "data.num_workers=1", "data.shuffle_buffer=16", "stage.global_batch=8",
          "stage.micro_batch=2", "stage.optim.warmup_steps=1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-4] == ("| CPB coords | seed | trained 32/w2 | 64/w4, no fine-tune | 32/w4, no fine-tune "
                         "| 64/w4, fine-tuned 2 steps |")
    for line, coords in zip(lines[-2:], ("log", "linear")):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:2] == [coords, "0"] and all(0 <= float(c) <= 100 for c in cells[2:])
        # The eval stage built the 64/w4 model with the windows the 32/w2 run's bias was trained at
        # (its maps are 8, 4, 2, 1: the last stage clamps to 1) and with the run's coordinates.
        evaluated = tmp_path / "runs" / f"{coords}_s0_64w4" / "eval"
        model = OmegaConf.load(evaluated / "config.yaml").model
        assert list(model.pretrained_window_sizes) == [2, 2, 2, 1] and model.cpb_coords == coords
        assert (tmp_path / "runs" / f"{coords}_s0_64w4" / "finetune" / "metrics.jsonl").exists()


def test_table_adds_a_mean_row_per_coords_over_seeds():
    args = parse_args(["--seeds", "0", "1", "--coords", "log"])
    rows = [dict(coords="log", seed=s, top1=[50.0 + s, 60.0, 40.0, 30.0, 20.0, 70.0 + 2 * s]) for s in (0, 1)]
    table = format_table(rows, args).splitlines()
    assert table[0] == ("| CPB coords | seed | trained 64/w4 | 128/w8, no fine-tune | 256/w16, no fine-tune "
                        "| 64/w8, no fine-tune | 64/w16, no fine-tune | 256/w16, fine-tuned 40 steps |")
    assert table[-1] == "| log | mean | 50.5 | 60.0 | 40.0 | 30.0 | 20.0 | 71.0 |"
