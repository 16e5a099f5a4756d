"""candle-ext: exact binary kernels, ReActNet-A and the CANDLE calibrate-and-distill method for long-tailed
recognition on binary networks."""
from candle_ext import nn
from candle_ext.backend import backends
from candle_ext.ops import binary_conv2d, multires_head, sign_pack, sign_ste, unpack
from candle_ext import models
from candle_ext.models import freeze, load_packed, save_packed

__version__ = "0.1.0"

__all__ = ["backends", "sign_pack", "unpack", "sign_ste", "binary_conv2d", "multires_head", "nn",
           "__version__"]
__all__ += ["models", "freeze", "save_packed", "load_packed"]
