"""Every binary conv shape of ReActNet-A at 224x224 input (MobileNetV1 channel plan), for the benchmarks.

Each block is a binary 3x3 conv (C -> C, the block's stride) and a binary 1x1 conv on its output: C -> C once
when the block keeps its width, twice (two C -> C convs whose outputs are concatenated) when it doubles it.
"""
from __future__ import annotations

from dataclasses import dataclass

# (in_channels, out_channels, stride) of the 13 blocks; the stem (stride 2) gives 112x112 before block 1.
BLOCKS = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)] + \
         [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]


@dataclass(frozen=True)
class BinaryConvShape:
    cin: int
    cout: int
    size: int  # input height = width
    kernel: int
    stride: int
    count: int  # how many times the network runs this shape

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    def macs(self, batch: int) -> int:
        return batch * self.cout * self.out_size ** 2 * self.cin * self.kernel ** 2

    def __str__(self):
        return f"{self.kernel}x{self.kernel}-c{self.cin}-o{self.cout}-{self.size}px-s{self.stride}"


def reactnet_a_shapes(resolution: int = 224):
    """Unique binary conv shapes with their multiplicity, in network order."""
    seen = {}
    size = resolution // 2
    for cin, cout, stride in BLOCKS:
        conv3 = (cin, cin, size, 3, stride)
        seen[conv3] = seen.get(conv3, 0) + 1
        size = (size + 2 - 3) // stride + 1
        conv1 = (cin, cin, size, 1, 1)
        seen[conv1] = seen.get(conv1, 0) + (2 if cout == 2 * cin else 1)
    return [BinaryConvShape(*k, count=v) for k, v in seen.items()]
