"""One Hungarian matcher with pluggable, weighted cost terms (DETR/Mask2Former/mmdet style).

Follows DETR's ``HungarianMatcher`` (per-image scipy ``linear_sum_assignment`` on a weighted cost)
and mmdet's ``HungarianAssigner``/K-Net's ``MaskHungarianAssigner`` (topk = 1). Differences: cost
terms come from a registry (:mod:`common.modeling.costs`) so one class covers K-Net, QueryInst and
FastInst; the cost is computed in fp32 with autocast off; a non-finite cost raises
``FloatingPointError`` (naming the terms and the image) instead of producing a silent wrong
assignment (FastInst issue #17).
"""

from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from common.modeling.costs import COST_TERMS, CostTerm, build_cost_term, register_cost_term

__all__ = [
    "HungarianMatcher",
    "costs_from_config",
    "slice_image_outputs",
    "COST_TERMS",
    "CostTerm",
    "build_cost_term",
    "register_cost_term",
]

CostSpec = Union[
    tuple[Union[str, CostTerm], float],
    tuple[str, float, Mapping[str, Any]],
]

#: output keys that are not per-query prediction tensors
_NON_PRED_KEYS = ("aux_outputs", "pred_matching_indices", "match_outputs")


def slice_image_outputs(outputs: Mapping[str, Any], index: int, batch_size: int) -> dict[str, Any]:
    """Image ``index`` of a batched prediction dict, detached and in fp32.

    Tensors whose first dim is ``batch_size`` are indexed; other entries (e.g.
    ``proposal_size``) pass through; ``aux_outputs``/``pred_matching_indices``/``match_outputs``
    are dropped.

    Returns:
        e.g. ``pred_logits`` [Q, K], ``pred_masks`` [Q, h, w], ``pred_boxes`` [Q, 4].
    """
    out: dict[str, Any] = {}
    for key, value in outputs.items():
        if key in _NON_PRED_KEYS:
            continue
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
            value = value[index].detach()
            out[key] = value.float() if value.is_floating_point() else value
        else:
            out[key] = value
    return out


def _parse_cost(entry: Any, key: str) -> tuple[str, float, dict[str, Any]]:
    """``"name:weight"`` or ``"name:weight:arg=value,arg=value"`` -> (name, weight, kwargs)."""
    parts = str(entry).split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise ValueError(
            f"{key}: entry {entry!r} is not 'name:weight' or 'name:weight:arg=value,...'"
        )
    name = parts[0].strip()
    if name not in COST_TERMS:
        raise ValueError(f"{key}: unknown cost term {name!r}; registered: {sorted(COST_TERMS)}")
    try:
        weight = float(parts[1])
    except ValueError:
        raise ValueError(f"{key}: entry {entry!r} has a non-numeric weight {parts[1]!r}") from None
    kwargs: dict[str, Any] = {}
    if len(parts) == 3 and parts[2].strip():
        import yaml

        for item in parts[2].split(","):
            arg, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"{key}: entry {entry!r}: expected arg=value, got {item!r}")
            kwargs[arg.strip()] = yaml.safe_load(value)
    return name, weight, kwargs


def costs_from_config(
    cfg: Any,
    default: Sequence[tuple[str, float]],
    term_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    provides: Sequence[str] | None = None,
    method: str = "this method",
) -> list[tuple[str, float, dict[str, Any]]]:
    """The matcher's cost terms of a method: ``MODEL.MATCHER.COSTS`` when set, else ``default``.

    ``MODEL.MATCHER.COSTS`` lists registered cost names with weights (``"dice_sq:4"``,
    ``"point_bce:5:num_points=12544"``). ``term_kwargs[name]`` are the method's own arguments
    of a term (K-Net's focal alpha/gamma, FastInst's point count); arguments in an entry win.
    Every method that matches with :class:`HungarianMatcher` builds its costs here, so any
    registered term can move between methods; ``provides`` lists the prediction keys the
    method's matcher sees, and a term needing another (``location`` on K-Net, a mask term on
    QueryInst's box matcher) is a ``ValueError`` naming it, ``method`` and the missing keys.

    Returns:
        ``[(name, weight, kwargs)]`` for :class:`HungarianMatcher`.
    """
    term_kwargs = term_kwargs or {}
    given = list(cfg.MODEL.MATCHER.COSTS)
    if given:
        parsed = [_parse_cost(e, "MODEL.MATCHER.COSTS") for e in given]
        for name, _, _ in parsed:
            missing = [k for k in COST_TERMS[name].required_keys if k not in (provides or ())]
            if provides is not None and missing:
                raise ValueError(
                    f"MODEL.MATCHER.COSTS: cost term {name!r} needs {missing}, which {method}'s "
                    f"matcher does not get (it gets {list(provides)})"
                )
    else:
        parsed = [(n, float(w), {}) for n, w in default]
    return [(n, w, {**term_kwargs.get(n, {}), **kw}) for n, w, kw in parsed]


class HungarianMatcher(nn.Module):
    """Bipartite matching of Q predictions to G targets per image with a weighted sum of costs.

    Args:
        cost_terms: sequence of ``(term, weight)`` or ``(name, weight, kwargs)``; ``term`` is a
            registered name (see :data:`common.modeling.costs.COST_TERMS`) or a :class:`CostTerm`.
            Terms with weight 0 are skipped. Examples (from the specs):

            - K-Net stages: ``[("focal_class", 2.0), ("dice_sq", 4.0), ("mask_agreement", 1.0)]``
            - QueryInst: ``[("focal_class", 2.0), ("box_l1", 5.0), ("giou", 2.0)]``
            - FastInst: ``[("softmax_class", 2.0), ("point_bce", 5.0), ("point_dice", 5.0),
              ("location", 1000.0)]``

    ``forward`` returns, per image, ``(query_idx, target_idx)`` int64 CPU tensors of length
    ``min(Q, G)``, sorted by query index (scipy's order, as DETR).
    """

    def __init__(self, cost_terms: Sequence[CostSpec]):
        super().__init__()
        terms: list[tuple[CostTerm, float]] = []
        for spec in cost_terms:
            if len(spec) == 3:
                term, weight, kwargs = spec  # type: ignore[misc]
                term = build_cost_term(term, **dict(kwargs))
            elif len(spec) == 2:
                term, weight = spec  # type: ignore[misc]
                if isinstance(term, str):
                    term = build_cost_term(term)
            else:
                raise ValueError(f"cost term spec must be (term, weight[, kwargs]), got {spec!r}")
            if not isinstance(term, CostTerm):
                raise TypeError(f"expected a CostTerm or a registered name, got {type(term)}")
            if weight < 0:
                raise ValueError(f"cost weight must be >= 0, got {weight} for {term.name}")
            if weight > 0:
                terms.append((term, float(weight)))
        if not terms:
            raise ValueError("HungarianMatcher needs at least one cost term with weight > 0")
        self.terms = terms

    @classmethod
    def from_weights(cls, weights: Mapping[str, float], **term_kwargs: Mapping[str, Any]):
        """Build from ``{name: weight}``; ``term_kwargs[name]`` gives that term's kwargs."""
        return cls([(n, w, term_kwargs.get(n, {})) for n, w in weights.items()])

    def extra_repr(self) -> str:
        return ", ".join(f"{w:g}*{t!r}" for t, w in self.terms)

    @property
    def term_names(self) -> list[str]:
        return [t.name for t, _ in self.terms]

    def compute_cost(
        self, pred: Mapping[str, Any], target: Mapping[str, Any], image_index: int = 0
    ) -> Tensor:
        """Weighted cost for one image.

        Args:
            pred: per-image predictions (see :func:`slice_image_outputs`), Q rows.
            target: per-image targets (``labels`` [G], ``masks`` [G, H, W], ``boxes`` [G, 4],
                ``image_size`` (h, w)), as the terms need.
            image_index: only used in error messages.

        Returns:
            [Q, G] float32 cost.

        Raises:
            KeyError: a term's prediction key is missing.
            FloatingPointError: the cost has NaN/Inf (the message names the terms and image).
        """
        cache: dict = {}
        total = None
        parts = []
        for term, weight in self.terms:
            missing = [k for k in term.required_keys if k not in pred]
            if missing:
                raise KeyError(f"cost term {term.name!r} needs prediction key(s) {missing}")
            cost = term(pred, target, cache).float()
            parts.append((term.name, cost))
            total = weight * cost if total is None else total + weight * cost
        assert total is not None
        if not bool(torch.isfinite(total).all()):
            bad = [n for n, c in parts if not bool(torch.isfinite(c).all())]
            culprit = bad if bad else [n for n, _ in parts]
            raise FloatingPointError(
                f"non-finite matching cost for image {image_index} from cost term(s) {culprit} "
                f"(shape {tuple(total.shape)}); check the predictions for NaN/Inf"
            )
        return total

    @staticmethod
    def assign(cost: Tensor) -> tuple[Tensor, Tensor]:
        """Minimum-cost assignment of a [Q, G] cost with scipy (rectangular allowed).

        Returns:
            (query_idx, target_idx): int64 CPU tensors of length min(Q, G), sorted by query.
        """
        if cost.shape[0] == 0 or cost.shape[1] == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return empty, empty.clone()
        rows, cols = linear_sum_assignment(cost.detach().cpu().double().numpy())
        return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)

    @torch.no_grad()
    def forward(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]
    ) -> list[tuple[Tensor, Tensor]]:
        """Match every image of the batch.

        Args:
            outputs: batched predictions, e.g. ``pred_logits`` [B, Q, K], ``pred_masks``
                [B, Q, h, w], ``pred_boxes`` [B, Q, 4], ``pred_locations`` [B, Q, 2].
            targets: B per-image target dicts (``labels`` [G_b] long, ...).

        Returns:
            B tuples ``(query_idx [M_b], target_idx [M_b])``, int64 on CPU, M_b = min(Q, G_b).
        """
        batch_size = len(targets)
        device_type = _device_type(outputs)
        indices = []
        with torch.autocast(device_type=device_type, enabled=False):
            for b, target in enumerate(targets):
                pred = slice_image_outputs(outputs, b, batch_size)
                num_queries = _num_rows(pred)
                num_targets = int(target["labels"].shape[0])
                if num_queries == 0 or num_targets == 0:
                    indices.append(self.assign(torch.empty(num_queries, num_targets)))
                    continue
                cost = self.compute_cost(pred, target, image_index=b)
                if cost.shape != (num_queries, num_targets):
                    raise ValueError(
                        f"cost shape {tuple(cost.shape)} != ({num_queries}, {num_targets})"
                    )
                indices.append(self.assign(cost))
        return indices


def _device_type(outputs: Mapping[str, Any]) -> str:
    for key, value in outputs.items():
        if key not in _NON_PRED_KEYS and isinstance(value, Tensor):
            return value.device.type
    return "cpu"


def _num_rows(pred: Mapping[str, Any]) -> int:
    for key in ("pred_logits", "pred_masks", "pred_boxes", "pred_locations"):
        if isinstance(pred.get(key), Tensor):
            return int(pred[key].shape[0])
    for value in pred.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise KeyError("no per-query prediction tensor in outputs")
