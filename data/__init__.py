"""Input pipeline: webdataset shards -> decoded, augmented batches (imports nothing from models/ or pretrain/).

data.shards (build_loader, ShardLoader), data.transforms (SimMIMTransform, SupervisedTransform, EvalTransform,
MaskGenerator, MixupCutmix), data.demo (write_demo_shards), data.decode (fast JPEG decode). Nothing is
imported here so that `python -m data.demo` starts without torch.
"""
