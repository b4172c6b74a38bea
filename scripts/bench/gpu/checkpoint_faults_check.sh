#!/usr/bin/env bash
# GPU check of the checkpoint fault path (docs/RELIABILITY.md) on NCCL, one process: save phases agreed with CUDA
# all-reduces, DeepSpeed's writer wrapper with CUDA tensors, resume, and a write failure (RLIMIT_FSIZE).
# From the repo root, with .wheels/ as for run_all.sh: bash scripts/bench/gpu/checkpoint_faults_check.sh
set -u
export PYTHONPATH=$PWD OMP_NUM_THREADS=8
python3 -m pip install -q --no-deps --no-index .wheels/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1
D=/tmp/gc; rm -rf $D; mkdir -p $D
python3 -c "from data.demo import write_demo_shards; write_demo_shards('$D/shards', num_classes=10, train_samples=96, val_samples=48, samples_per_shard=24, image_size=(80, 64), seed=0)"
ARGS="+stage=simmim run_root=$D/runs logger=none logger.every=1 data.train_urls=$D/shards/train.txt data.val_urls=$D/shards/val.txt data.samples_per_epoch=96 data.val_samples=48 data.num_workers=1 data.shuffle_buffer=16 data.decoder=pillow model.img_size=64 model.window_size=4 stage.global_batch=8 stage.micro_batch=2 stage.optim.warmup_steps=1 stage.mask_patch_size=16 checkpoint.every_steps=2"
run() { local t=$1; shift; timeout $t python3 launch/pretrain.py "$@" > $D/out.log 2>&1; echo "exit $?"; grep -E "resumed from|saved checkpoint|CheckpointError:|PeerFailure:" $D/out.log | cut -c1-400 | tail -4; }
E="experiment_name=ds engine=deepspeed"
echo "== deepspeed ZeRO-3, 4 steps"; run 150 $ARGS $E stage.steps=4
echo "== deepspeed: resume, to 6"; run 100 $ARGS $E stage.steps=6
echo "== deepspeed: files limited to 2 MB (ulimit -f), the save at 8 fails"; (ulimit -f 2048; run 100 $ARGS $E stage.steps=8)
ls $D/runs/ds/simmim/checkpoints; echo "latest: $(cat $D/runs/ds/simmim/checkpoints/latest)"
E="experiment_name=fsdp engine=fsdp"
echo "== fsdp: 2 steps"; run 120 $ARGS $E stage.steps=2
echo "== fsdp: files limited to 2 MB, the save at 4 fails"; (ulimit -f 2048; run 100 $ARGS $E stage.steps=4)
ls $D/runs/fsdp/simmim/checkpoints; echo "latest: $(cat $D/runs/fsdp/simmim/checkpoints/latest)"
