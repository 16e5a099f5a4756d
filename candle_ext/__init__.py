"""candle-ext: exact binary kernels, ReActNet-A and the CANDLE calibrate-and-distill method for long-tailed
recognition on binary networks."""
from candle_ext import nn
from candle_ext.backend import backends
from candle_ext import ops
from candle_ext.ops import *  # noqa: F401,F403  the op functions, ops.__all__: a new op needs no line here
from candle_ext import models
from candle_ext.models import freeze, load_packed, save_packed

__version__ = "0.1.0"

__all__ = ["backends", *ops.__all__, "nn", "__version__"]
__all__ += ["models", "freeze", "save_packed", "load_packed"]
