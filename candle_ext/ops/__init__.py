"""The functional ops: torch.library custom ops with fake kernels and autograd, dispatched by backend.py."""
from candle_ext.ops.sign_pack import sign_pack, unpack
from candle_ext.ops.binary_conv2d import binary_conv2d
from candle_ext.ops.multires_head import multires_head
from candle_ext.ops.sign_ste import sign_ste

__all__ = ["sign_pack", "unpack", "sign_ste", "binary_conv2d", "multires_head"]
