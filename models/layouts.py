"""Other libraries' SwinV2 weight layouts, mapped to and from this package's (official) names in one place.

- timm (timm/models/swin_transformer_v2.py, 1.0.31, `swinv2_*` models): the official names, except that each
  stage's patch merging sits at the start of the next stage (`layers.{i+1}.downsample`, none in stage 0) and
  the classifier is `head.fc`.
- transformers (models/swinv2/modeling_swinv2.py, 5.25.0): `Swinv2Model` names (`embeddings.*`,
  `encoder.layers.*`, `layernorm`), under `swinv2.` beside a `classifier` in `Swinv2ForImageClassification`;
  q, k and v are three Linears (k without bias) where the official code has one `qkv` weight plus `q_bias` and
  `v_bias`. Patch merging concatenates the 2x2 neighbours in the official order, at the end of a stage.

Neither computes the extra main-branch LayerNorm of H/G (`norm3`, `extra_norm_period`) nor the linear-spaced
CPB (`cpb_coords: linear`): `inexpressible` names what a layout cannot hold.
"""
import pickle
from pathlib import Path

import torch

LAYOUTS = ("official", "timm", "hf")
HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"

# (official, transformers) name prefixes: outside the blocks, then inside a block (after `blocks.{j}.`).
_HF_TOP = (("patch_embed.proj.", "embeddings.patch_embeddings.projection."),
           ("patch_embed.norm.", "embeddings.norm."),
           ("mask_token", "embeddings.mask_token"),
           ("layers.", "encoder.layers."),
           ("norm.", "layernorm."),
           ("head.", "classifier."))
_HF_BLOCK = (("attn.logit_scale", "attention.self.logit_scale"),
             ("attn.cpb_mlp.", "attention.self.continuous_position_bias_mlp."),
             ("attn.q_bias", "attention.self.query.bias"),
             ("attn.v_bias", "attention.self.value.bias"),
             ("attn.proj.", "attention.output.dense."),
             ("norm1.", "layernorm_before."),
             ("mlp.fc1.", "intermediate.dense."),
             ("mlp.fc2.", "output.dense."),
             ("norm2.", "layernorm_after."))
_HF_QKV = ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight")
_HF_PREFIX = "swinv2."  # Swinv2PreTrainedModel.base_model_prefix
_HF_STEM = "embeddings.patch_embeddings.projection.weight"
# Official checkpoints (and timm's, as buffers) store these; every layout rebuilds them for the target window.
REBUILT_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask", "attn.k_bias")


def detect_layout(state_dict: dict) -> str:
    """"hf", "timm" or "official" (SimMIM's `encoder.*` names count as official)."""
    if any(k.endswith(_HF_STEM) for k in state_dict):
        return "hf"
    if ("layers.0.downsample.reduction.weight" not in state_dict
            and "layers.1.downsample.reduction.weight" in state_dict):
        return "timm"
    return "official"


def to_official(state_dict: dict) -> dict:
    """Official names for a state dict in any layout, without the shape-derived buffers that every layout
    rebuilds for its window (`REBUILT_BUFFERS`) and with the early official `rpe_mlp` renamed `cpb_mlp`. A
    transformers one keeps only `swinv2.*` / bare model weights and the classifier (a masked-image-modelling
    decoder is dropped)."""
    state_dict = {k.replace("rpe_mlp", "cpb_mlp"): v for k, v in state_dict.items()
                  if not any(b in k for b in REBUILT_BUFFERS)}
    layout = detect_layout(state_dict)
    if layout == "hf":
        return _from_hf(state_dict)
    if layout == "timm":
        return {_timm_name(k, to_timm=False): v for k, v in state_dict.items()}
    return state_dict


def from_official(state_dict: dict, layout: str) -> dict:
    """A bare SwinV2 state dict (official names, no shape-derived buffers) in `layout`. transformers names get
    the `swinv2.` prefix of Swinv2ForImageClassification when there is a head, else Swinv2Model's bare names."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    reason = inexpressible(state_dict, layout)
    if reason:
        raise ValueError(reason)
    if layout == "timm":
        return {_timm_name(k, to_timm=True): v for k, v in state_dict.items()}
    if layout == "hf":
        return _to_hf(state_dict)
    return state_dict


def inexpressible(state_dict: dict, layout: str, cpb_coords: str = "log") -> str | None:
    """One line saying what of this model `layout` cannot hold, or None."""
    if layout == "official":
        return None
    library = {"timm": "timm's swinv2_* model", "hf": "transformers' Swinv2"}[layout]
    extra = next((k for k in state_dict if ".norm3." in k), None)
    if extra:
        return (f"{library} has no extra main-branch LayerNorm (extra_norm_period, the H/G norm every 6 blocks; "
                f"e.g. {extra}): use --to official")
    if cpb_coords != "log":
        return f"{library} computes only the log-spaced position bias, this model uses cpb_coords={cpb_coords}"
    return None


def _timm_name(name: str, to_timm: bool) -> str:
    if ".downsample." in name:
        _, stage, rest = name.split(".", 2)
        return f"layers.{int(stage) + (1 if to_timm else -1)}.{rest}"
    if to_timm:
        return name.replace("head.", "head.fc.", 1) if name.startswith("head.") else name
    return name.replace("head.fc.", "head.", 1) if name.startswith("head.fc.") else name


def _swap(name: str, pairs, reverse: bool) -> str | None:
    for ours, theirs in pairs:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        if name.startswith(src):
            return dst + name[len(src):]
    return None


def _block(name: str) -> tuple[str, str] | None:
    """`...layers.{i}.blocks.{j}.` and the rest of a block parameter's name, else None."""
    head, sep, rest = name.partition(".blocks.")
    if not sep:
        return None
    j, _, suffix = rest.partition(".")
    return f"{head}.blocks.{j}.", suffix


def _hf_name(name: str, reverse: bool) -> str | None:
    """The transformers name of an official one (reverse: the official name of a transformers one), for all
    but the q/k/v weights; None for a name with no counterpart."""
    block = _block(name)
    if block is None:
        return _swap(name, _HF_TOP, reverse)
    rest = _swap(block[1], _HF_BLOCK, reverse)
    return rest and _swap(block[0], _HF_TOP, reverse) + rest


def _to_hf(state_dict: dict) -> dict:
    prefix = _HF_PREFIX if any(k.startswith("head.") for k in state_dict) else ""
    out = {}
    for name, v in state_dict.items():
        block = _block(name)
        if block and block[1] == "attn.qkv.weight":
            stem = _swap(block[0], _HF_TOP, reverse=False)
            for suffix, part in zip(_HF_QKV, v.chunk(3)):
                out[prefix + stem + suffix] = part.clone()  # its own storage: safetensors refuses shared ones
            continue
        hf = _hf_name(name, reverse=False)
        if hf is None:
            raise ValueError(f"{name}: no transformers Swinv2 counterpart")
        out[hf if hf.startswith("classifier.") else prefix + hf] = v
    return out


def _from_hf(state_dict: dict) -> dict:
    if any(k.startswith(_HF_PREFIX) for k in state_dict):
        state_dict = {k[len(_HF_PREFIX):] if k.startswith(_HF_PREFIX) else k: v for k, v in state_dict.items()}
    out, qkv = {}, {}
    for name, v in state_dict.items():
        block = _block(name)
        if block and block[1] in _HF_QKV:
            qkv.setdefault(block[0], {})[block[1]] = v
            continue
        ours = _hf_name(name, reverse=True)
        if ours is not None:  # anything else (a masked-image-modelling decoder) is not the backbone
            out[ours] = v
    for stem, parts in qkv.items():
        if set(parts) != set(_HF_QKV):
            raise ValueError(f"{stem}attention.self: needs query, key and value weights, has {sorted(parts)}")
        out[_swap(stem, _HF_TOP, reverse=True) + "attn.qkv.weight"] = torch.cat([parts[k] for k in _HF_QKV])
    return out


def hf_config(arch: dict, labels: list[str] | None) -> dict:
    """transformers' Swinv2Config fields for a model of `arch` (SwinTransformerV2 keyword arguments); with
    `labels` (one name per class) a classifier (Swinv2ForImageClassification), else the bare Swinv2Model."""
    n = len(arch["depths"])
    config = {
        "model_type": "swinv2",
        "architectures": ["Swinv2ForImageClassification" if labels else "Swinv2Model"],
        "image_size": arch["img_size"], "patch_size": arch["patch_size"], "num_channels": arch["in_chans"],
        "embed_dim": arch["embed_dim"], "depths": list(arch["depths"]), "num_heads": list(arch["num_heads"]),
        "window_size": arch["window_size"], "pretrained_window_sizes": list(arch["pretrained_window_sizes"]),
        "mlp_ratio": arch["mlp_ratio"], "qkv_bias": True, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
        "use_absolute_embeddings": False, "encoder_stride": arch["patch_size"] * 2 ** (n - 1), "dtype": "float32",
    }
    if labels:
        config["id2label"] = {str(i): name for i, name in enumerate(labels)}
        config["label2id"] = {name: i for i, name in enumerate(labels)}
    return config


def arch_from_hf_config(config: dict) -> dict:
    """SwinTransformerV2 keyword arguments from a transformers Swinv2 config.json (the geometry its weights
    were trained at; the head size comes from the weights)."""
    if config.get("model_type") != "swinv2":
        raise ValueError(f"not a transformers Swinv2 config (model_type {config.get('model_type')!r})")
    if config.get("use_absolute_embeddings"):
        raise ValueError("this transformers Swinv2 uses absolute position embeddings, which SwinV2 does not have")
    return {"img_size": config.get("image_size", 224), "patch_size": config.get("patch_size", 4),
            "in_chans": config.get("num_channels", 3), "embed_dim": config.get("embed_dim", 96),
            "depths": list(config.get("depths", (2, 2, 6, 2))),
            "num_heads": list(config.get("num_heads", (3, 6, 12, 24))),
            "window_size": config.get("window_size", 7),
            "pretrained_window_sizes": list(config.get("pretrained_window_sizes", (0, 0, 0, 0))),
            "mlp_ratio": config.get("mlp_ratio", 4.0)}


def read_weights(path: str | Path) -> dict:
    """A state dict from a file or a transformers folder, without unpickling anything but tensors:
    `.safetensors`, a transformers folder (`model.safetensors`), else torch.load(weights_only=True). A file
    that is none of these, or pickles objects, is a ValueError that starts with its path."""
    path = Path(path)
    if path.is_dir():
        if not (path / HF_WEIGHTS).is_file():
            raise FileNotFoundError(f"{path} holds no {HF_WEIGHTS} (a transformers folder)")
        path = path / HF_WEIGHTS
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except SafetensorError as err:
            raise ValueError(f"{path}: not a safetensors file ({err})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: not a plain tensor file (it pickles objects, which are never loaded): "
                         f"{str(err).splitlines()[0]}") from None
    except (EOFError, KeyError, IndexError, RuntimeError) as err:  # empty, truncated or not torch's format at all
        raise ValueError(f"{path}: not a torch checkpoint file ({type(err).__name__}: {err})") from None


def save_safetensors(state_dict: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors needs each tensor to own its storage (merged ZeRO weights are views of flat buffers)."""
    from safetensors.torch import save_file

    def owned(v):
        v = v.detach().contiguous()
        return v if v.untyped_storage().nbytes() == v.numel() * v.element_size() else v.clone()
    save_file({k: owned(v) for k, v in state_dict.items()}, str(path), metadata=metadata)


# timm 1.0.31's swinv2_{size}_window{w}_{img} models trained at one size (the `XtoY` fine-tune names aside),
# and the sizes by (embed_dim, depths).
_TIMM_NAMES = ("swinv2_tiny_window8_256", "swinv2_tiny_window16_256", "swinv2_small_window8_256",
               "swinv2_small_window16_256", "swinv2_base_window8_256", "swinv2_base_window16_256",
               "swinv2_base_window12_192", "swinv2_large_window12_192")
_TIMM_SIZES = {(96, (2, 2, 6, 2), (3, 6, 12, 24)): "tiny", (96, (2, 2, 18, 2), (3, 6, 12, 24)): "small",
               (128, (2, 2, 18, 2), (4, 8, 16, 32)): "base", (192, (2, 2, 18, 2), (6, 12, 24, 48)): "large"}


def timm_model_args(arch: dict, num_classes: int) -> tuple[str, dict]:
    """The timm model name and `timm.create_model` keyword arguments that build `arch`: the name of its size
    (exactly its image size and window where timm registers one), the geometry passed explicitly."""
    size = _TIMM_SIZES.get((arch["embed_dim"], tuple(arch["depths"]), tuple(arch["num_heads"])))
    exact = f"swinv2_{size}_window{arch['window_size']}_{arch['img_size']}"
    name = exact if exact in _TIMM_NAMES else next((n for n in _TIMM_NAMES if n.startswith(f"swinv2_{size}_")),
                                                   _TIMM_NAMES[0])
    kwargs = {"num_classes": num_classes, "img_size": arch["img_size"], "window_size": arch["window_size"]}
    if size is None:
        kwargs.update(embed_dim=arch["embed_dim"], depths=tuple(arch["depths"]), num_heads=tuple(arch["num_heads"]))
    for key, default in (("patch_size", 4), ("in_chans", 3), ("mlp_ratio", 4.0),
                         ("pretrained_window_sizes", (0,) * len(arch["depths"]))):
        value = tuple(arch[key]) if isinstance(arch[key], (list, tuple)) else arch[key]
        if value != default:
            kwargs[key] = value
    return name, kwargs
