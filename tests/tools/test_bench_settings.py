"""Benchmark plumbing without training: schedule overrides, --weights for the default entries,
and GFLOPs of a model whose output does not depend on the computation."""

import os

import torch
from torch import nn

from tools import (
    bench_measure,
    benchmark,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_schedule_opts_come_before_the_callers():
    s = benchmark.settings_for("cpu", opts=("INPUT.MIN_SIZE_TRAIN", "(96,)"))
    assert s.opts[:2] == ("INPUT.MIN_SIZE_TRAIN", "(64,)")  # the schedule's
    assert s.opts[-2:] == ("INPUT.MIN_SIZE_TRAIN", "(96,)")  # the caller's, applied last
    assert (s.image_size, s.max_iter, s.input_size) == (64, 300, 64)


def test_weights_without_config_map_onto_the_default_entries():
    n = len(benchmark.DEFAULT_ENTRIES)
    args = benchmark.build_parser().parse_intermixed_args(["--weights", *["-"] * (n - 1), "x.pth"])
    entries = benchmark.entries_from_args(args)
    assert [e.method for e in entries] == [e.method for e in benchmark.DEFAULT_ENTRIES]
    assert entries[-1].weights == os.path.abspath("x.pth") and entries[0].weights is None


class ConstantOutput(nn.Module):
    """Computes a convolution but returns a constant (like an empty panoptic map)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, batched_inputs):
        x = batched_inputs[0]["image"].float()[None]
        self.conv(x)
        return [{"sem_seg": torch.zeros(1, 4, 4)}]


def test_gflops_fall_back_when_the_trace_is_empty():
    model = ConstantOutput()
    gflops, uncounted = bench_measure.count_gflops(model, [{"image": torch.ones(3, 16, 16)}])
    assert bench_measure.FLOP_COUNTER_FALLBACK in uncounted
    assert gflops * 1e9 == 8 * 3 * 9 * 16 * 16  # multiply-adds of the conv
