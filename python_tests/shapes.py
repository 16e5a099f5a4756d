"""Random shape generators shared by the CPU, Triton and GPU tests (one generator, so every backend is
checked on the same kind of inputs)."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class ConvConfig:
    n: int
    cin: int
    cout: int
    h: int
    w: int
    k: int
    stride: int
    padding: int
    dilation: int

    def out_size(self, size: int) -> int:
        return (size + 2 * self.padding - self.dilation * (self.k - 1) - 1) // self.stride + 1

    def valid(self) -> bool:
        return self.out_size(self.h) >= 1 and self.out_size(self.w) >= 1

    def __str__(self):
        return (f"n{self.n}-c{self.cin}-o{self.cout}-{self.h}x{self.w}-k{self.k}-s{self.stride}"
                f"-p{self.padding}-d{self.dilation}")


def random_conv_configs(count: int, seed: int, max_channels: int = 300, max_hw: int = 33, max_batch: int = 4,
                        max_cout: int = 70):
    """`count` valid configs: channels 1..max_channels (multiples of 32/64 and their neighbours favoured),
    kernel 1/3/5, stride 1/2, padding 0/1/2, dilation 1/2, batch 1..max_batch, H/W 1..max_hw."""
    rng = random.Random(seed)
    special = [c for c in (1, 31, 32, 33, 63, 64, 65, 96, 127, 128, 129, 255, 256, 257, 300) if c <= max_channels]
    configs = []
    while len(configs) < count:
        cin = rng.choice(special) if rng.random() < 0.4 else rng.randint(1, max_channels)
        cfg = ConvConfig(
            n=rng.randint(1, max_batch), cin=cin, cout=rng.randint(1, max_cout),
            h=rng.randint(1, max_hw), w=rng.randint(1, max_hw), k=rng.choice((1, 3, 5)),
            stride=rng.choice((1, 2)), padding=rng.choice((0, 1, 2)), dilation=rng.choice((1, 2)))
        if cfg.valid():
            configs.append(cfg)
    return configs


def random_multires_configs(count: int, seed: int, max_ct: int = 96, max_cs: int = 48):
    """(n, c_t, c_s, sizes [(h, w) per resolution], base) with small, base and large maps around the base."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        hb, wb = rng.randint(1, 9), rng.randint(1, 9)
        small = (rng.randint(1, hb), rng.randint(1, wb))
        large = (rng.randint(hb, 2 * hb + 3), rng.randint(wb, 2 * wb + 3))
        out.append((rng.randint(1, 3), rng.randint(1, max_ct), rng.randint(1, max_cs), [small, (hb, wb), large], 1))
    return out
