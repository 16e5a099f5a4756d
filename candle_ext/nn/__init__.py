"""Drop-in modules."""
from candle_ext.nn.layers import BinaryConv2d, LearnableBias, RPReLU, RSign
from candle_ext.nn.binarize import binarize_
from candle_ext.nn.multires import MultiResolutionTeacher
from candle_ext.nn.sync_batchnorm import GlooSyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

__all__ = ["BinaryConv2d", "LearnableBias", "RSign", "RPReLU", "MultiResolutionTeacher"]
__all__ += ["binarize_", "GlooSyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]
