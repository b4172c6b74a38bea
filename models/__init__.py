from models.flops import simmim_forward_flops, swinv2_forward_flops
from models.simmim import SimMIM, encoder_state_dict
from models.swinv2 import SwinTransformerV2, checkpoint_filter_fn, init_module, load_pretrained

__all__ = ["SwinTransformerV2", "SimMIM", "encoder_state_dict", "checkpoint_filter_fn", "load_pretrained",
           "init_module", "swinv2_forward_flops", "simmim_forward_flops"]
