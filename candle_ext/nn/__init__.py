"""Drop-in modules."""
from candle_ext.nn.layers import BinaryConv2d, LearnableBias, RPReLU, RSign

__all__ = ["BinaryConv2d", "LearnableBias", "RSign", "RPReLU"]
