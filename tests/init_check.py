"""Checks that a freshly built model's parameters follow an initialisation scheme, tensor by
tensor (issue 18, item 4). Used by the parity suite against a fresh reference build and by the
per-method init tests against the initialisation the spec states.

A tensor's expected initialisation is either a reference tensor (a sample of the reference's
``init_weights``) or an analytic :class:`Dist`:

- deterministic tensors (a reference tensor with at most ``MAX_DETERMINISTIC_VALUES`` distinct
  values, e.g. LayerNorm ones, zero biases, the focal prior ``-log(99)``, Sparse R-CNN's
  whole-image proposal boxes; or ``Const``) must be equal exactly;
- random tensors must match in mean (within ``Z`` standard errors), in standard deviation
  (within ``Z`` standard errors of the std estimate, computed from the sample's fourth moment) and
  in distribution (two-sample / one-sample Kolmogorov-Smirnov p-value above ``P_MIN``, which tells
  uniform from normal at the sizes of real layers). Tensors with fewer than ``MIN_RANDOM``
  elements are checked for mean and std only.

``Z`` and ``P_MIN`` are loose enough that a correct init fails with probability < 1e-4 per tensor
and tight enough that a gain off by 10 % fails on tensors of >= 10^4 elements (the sizes of the
layers that matter); the tests run with fixed seeds, so a result is repeatable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from scipy import stats

MAX_DETERMINISTIC_VALUES = 4
MIN_RANDOM = 64
Z = 5.0
P_MIN = 1e-4


@dataclass(frozen=True)
class Dist:
    """An analytic init: ``kind`` "const" (``a`` = value), "uniform" (``a``, ``b``), "normal"
    (``a`` = mean, ``b`` = std) or "trunc_normal" (mean ``a``, std ``b``, cut at ``lo``/``hi``,
    as ``torch.nn.init.trunc_normal_``)."""

    kind: str
    a: float = 0.0
    b: float = 1.0
    lo: float = -2.0
    hi: float = 2.0

    def scipy(self):
        if self.kind == "uniform":
            return stats.uniform(loc=self.a, scale=self.b - self.a)
        if self.kind == "normal":
            return stats.norm(loc=self.a, scale=self.b)
        if self.kind == "trunc_normal":
            lo, hi = (self.lo - self.a) / self.b, (self.hi - self.a) / self.b
            return stats.truncnorm(lo, hi, loc=self.a, scale=self.b)
        raise ValueError(f"no distribution for {self.kind!r}")


def Const(value: float) -> Dist:  # noqa: N802 (reads as a type in the spec tables)
    return Dist("const", float(value))


def Uniform(a: float, b: float) -> Dist:  # noqa: N802
    return Dist("uniform", float(a), float(b))


def Normal(mean: float, std: float) -> Dist:  # noqa: N802
    return Dist("normal", float(mean), float(std))


def xavier_uniform(shape, gain: float = 1.0) -> Dist:
    fan_in, fan_out = _fans(shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return Uniform(-bound, bound)


def kaiming_uniform(shape, a: float = math.sqrt(5), mode: str = "fan_in") -> Dist:
    """``torch.nn.init.kaiming_uniform_`` (leaky_relu gain with slope ``a``)."""
    fan_in, fan_out = _fans(shape)
    gain = math.sqrt(2.0 / (1 + a * a))
    bound = gain * math.sqrt(3.0 / (fan_in if mode == "fan_in" else fan_out))
    return Uniform(-bound, bound)


def kaiming_normal(shape, mode: str = "fan_out", nonlinearity_gain: float = math.sqrt(2)) -> Dist:
    fan_in, fan_out = _fans(shape)
    return Normal(0.0, nonlinearity_gain / math.sqrt(fan_in if mode == "fan_in" else fan_out))


def torch_default_bias(weight_shape) -> Dist:
    """The bias of ``nn.Linear``/``nn.Conv*``: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    fan_in, _ = _fans(weight_shape)
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return Uniform(-bound, bound)


def _fans(shape) -> tuple[int, int]:
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"fan-in/fan-out need >= 2 dims, got {shape}")
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def _moments(x: torch.Tensor) -> tuple[float, float, float]:
    x = x.detach().double().flatten()
    mean = float(x.mean())
    std = float(x.std(unbiased=False))
    m4 = float(((x - mean) ** 4).mean())
    return mean, std, m4


def _std_se(std: float, m4: float, n: int) -> float:
    # standard error of the sample std: Var(s^2) ~ (m4 - s^4) / n, s.e.(s) = s.e.(s^2) / (2 s)
    if std == 0:
        return 0.0
    return math.sqrt(max(m4 - std**4, 0.0) / n) / (2 * std)


def _deterministic(t: torch.Tensor) -> bool:
    return t.numel() > 0 and torch.unique(t.detach()).numel() <= MAX_DETERMINISTIC_VALUES


def check_init(name: str, got: torch.Tensor, expected: torch.Tensor | Dist) -> str | None:
    """None if ``got`` follows ``expected``, else a one-line reason naming ``name``."""
    got = got.detach().cpu()
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().cpu()
        if tuple(got.shape) != tuple(expected.shape):
            return f"{name}: shape {tuple(got.shape)} vs reference {tuple(expected.shape)}"
        if _deterministic(expected):
            if torch.equal(got.to(expected.dtype), expected):
                return None
            diff = (got.double() - expected.double()).abs().max().item()
            return f"{name}: deterministic init differs from the reference (max |diff| {diff:.3g})"
        if _deterministic(got):
            return f"{name}: deterministic ({torch.unique(got)[:4].tolist()}) but reference random"
        return _compare_random(name, got, expected.double().flatten().numpy(), None)
    if expected.kind == "const":
        if bool((got == expected.a).all()):
            return None
        return f"{name}: expected the constant {expected.a}, got mean {got.double().mean():.4g}"
    if _deterministic(got):
        return f"{name}: deterministic ({torch.unique(got)[:4].tolist()}) but expected {expected}"
    return _compare_random(name, got, None, expected)


def _compare_random(name, got, ref_sample, dist: Dist | None) -> str | None:
    n = got.numel()
    mean, std, m4 = _moments(got)
    if dist is not None:
        law = dist.scipy()
        r_mean, r_std = float(law.mean()), float(law.std())
        r_m4 = float(law.moment(4) - 4 * law.mean() * law.moment(3) + 6 * law.mean() ** 2
                     * law.moment(2) - 3 * law.mean() ** 4)  # fmt: skip
        r_n = math.inf
    else:
        r_mean, r_std, r_m4 = _moments(torch.from_numpy(ref_sample))
        r_n = ref_sample.size
    mean_se = math.hypot(std / math.sqrt(n), r_std / math.sqrt(r_n))
    if abs(mean - r_mean) > Z * mean_se + 1e-12:
        return (f"{name}: mean {mean:.4g} vs expected {r_mean:.4g} "
                f"(> {Z} s.e. = {Z * mean_se:.3g}; std {std:.4g} vs {r_std:.4g})")  # fmt: skip
    std_se = math.hypot(_std_se(std, m4, n), _std_se(r_std, r_m4, r_n) if r_n < math.inf else 0)
    if abs(std - r_std) > Z * std_se + 1e-12:
        return (f"{name}: std {std:.4g} vs expected {r_std:.4g} "
                f"(> {Z} s.e. = {Z * std_se:.3g}; ratio {std / r_std:.3f})")  # fmt: skip
    if n >= MIN_RANDOM:
        sample = got.double().flatten().numpy()
        if dist is not None:
            p = stats.kstest(sample, dist.scipy().cdf).pvalue
        else:
            p = stats.ks_2samp(sample, ref_sample).pvalue
        if p < P_MIN:
            return f"{name}: distribution differs (Kolmogorov-Smirnov p = {p:.2g} < {P_MIN})"
    return None


def init_mismatches(
    got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor | Dist]
) -> list[str]:
    """Reasons for every tensor of ``expected`` that ``got`` does not follow (or lacks)."""
    problems = []
    for name, exp in expected.items():
        if name not in got:
            problems.append(f"{name}: missing from the model")
            continue
        reason = check_init(name, got[name], exp)
        if reason:
            problems.append(reason)
    return problems


def expected_from_rules(
    state: Mapping[str, torch.Tensor], rules, skip: tuple[str, ...] = ()
) -> tuple[dict[str, Dist], list[str]]:
    """Expected init per tensor of ``state`` from ``rules``: ``[(regex, dist_or_fn), ...]``, the
    first ``re.fullmatch`` wins; ``dist_or_fn`` is a :class:`Dist` or ``fn(shape) -> Dist``
    (e.g. :func:`xavier_uniform`). Keys starting with a prefix in ``skip`` are left out.

    Returns:
        (expected, unmatched keys) - a test asserts that nothing is unmatched, so every
        parameter of the model has a stated init.
    """
    import re

    expected, unmatched = {}, []
    for key, tensor in state.items():
        if key.startswith(skip):
            continue
        for pattern, rule in rules:
            if re.fullmatch(pattern, key):
                expected[key] = rule if isinstance(rule, Dist) else rule(tuple(tensor.shape))
                break
        else:
            unmatched.append(key)
    return expected, unmatched
