"""Builder of official-layout state dicts for the converter tests: ``{key: tensor}`` with the
spec's names and shapes, random (seeded) values, or zeros for key-only tests."""

from __future__ import annotations

import math

import torch


class OfficialState(dict):
    def __init__(self, seed: int, zeros: bool):
        super().__init__()
        self.g = torch.Generator().manual_seed(seed)
        self.zeros = zeros

    def t(self, key: str, *shape: int, scale: float = 0.05, offset: float = 0.0) -> None:
        if self.zeros:
            self[key] = torch.zeros(shape)
        else:
            self[key] = torch.randn(shape, generator=self.g) * scale + offset

    def conv(self, prefix: str, cout: int, cin: int, k: int = 3, bias: bool = True) -> None:
        self.t(prefix + "weight", cout, cin, k, k, scale=1 / math.sqrt(cin * k * k))
        if bias:
            self.t(prefix + "bias", cout)

    def linear(self, prefix: str, cout: int, cin: int) -> None:
        self.t(prefix + "weight", cout, cin, scale=1 / math.sqrt(cin))
        self.t(prefix + "bias", cout)

    def norm(self, prefix: str, c: int, frozen: bool = True) -> None:
        """Affine norm; ``frozen`` adds BatchNorm running statistics (no counter)."""
        self.t(prefix + "weight", c, scale=0.1, offset=1.0)
        self.t(prefix + "bias", c)
        if frozen:
            self.t(prefix + "running_mean", c)
            self[prefix + "running_var"] = (
                torch.zeros(c) if self.zeros else torch.rand(c, generator=self.g) + 0.5
            )

    def scale(self, key: str) -> None:
        self[key] = torch.zeros(1) if self.zeros else torch.rand(1, generator=self.g) + 0.5
