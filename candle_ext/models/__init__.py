"""ReActNet-A, its OPs count, and the packed (1-bit) inference form of trained binary models."""
from candle_ext.models.ops_count import count_ops
from candle_ext.models.packed import PackedBinaryConv2d, freeze, load_packed, save_packed
from candle_ext.models.reactnet import (ClassifierHead, PackedClassifierHead, PackedReActBlock, ReActBlock, ReActNetA,
                                       reactnet_a)

__all__ = ["reactnet_a", "ReActNetA", "ReActBlock", "ClassifierHead", "count_ops", "freeze", "save_packed",
           "load_packed", "PackedBinaryConv2d", "PackedReActBlock", "PackedClassifierHead"]
