"""Set criterion shared by the four methods: match -> all-reduced normaliser -> loss terms ->
aux/stage loop -> weights.

Follows DETR/Mask2Former's ``SetCriterion``. Differences: loss terms come from a registry
(:mod:`common.modeling.loss_terms`); the criterion applies the weights itself and a loss key without
a weight is an error (Mask2Former silently drops it); stage-wise keys and weights (K-Net/QueryInst
``stage_loss_weights``); fixed matchings (``pred_matching_indices``, FastInst's GT-mask-guided
outputs); matching on other predictions than the ones the loss is applied to (K-Net matches stage t
on stage t-1).
"""

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from common.modeling.loss_terms import LOSS_TERMS, LossTerm, build_loss_term, register_loss_term

__all__ = [
    "SetCriterion",
    "reduce_normalizer",
    "LOSS_TERMS",
    "LossTerm",
    "build_loss_term",
    "register_loss_term",
]

LossSpec = Union[str, LossTerm, tuple[str, Mapping[str, Any]], Callable[..., dict[str, Tensor]]]
Indices = list[tuple[Tensor, Tensor]]


def reduce_normalizer(count: float, device: torch.device) -> float:
    """All-reduce a local count (sum over workers), divide by the world size, clamp to >= 1.

    This is Mask2Former's ``num_masks`` and mmdet's ``reduce_mean(num_pos).clamp(min=1)``.
    With DDP's gradient averaging, ``sum_local / reduce_normalizer(local count)`` on W workers
    gives the same gradient as ``sum_all / total count`` on one worker.

    Args:
        count: local number (e.g. targets in this worker's batch).
        device: device of the reduction tensor (the backend's device: CPU for gloo).

    Returns:
        Python float >= 1.
    """
    value = torch.tensor([float(count)], dtype=torch.float32, device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world > 1:
            dist.all_reduce(value)
    return max(float(value.item()) / world, 1.0)


class SetCriterion(nn.Module):
    """Losses of a set-prediction head with Hungarian matching.

    Args:
        matcher: callable ``(outputs, targets) -> indices`` (a
            :class:`~common.modeling.matcher.HungarianMatcher`).
        num_classes: C, the number of foreground classes (the no-object class of softmax heads
            is C).
        losses: loss terms: registered names (:data:`common.modeling.loss_terms.LOSS_TERMS`, built
            with ``num_classes`` and ``loss_kwargs[name]``), ``(name, kwargs)``, :class:`LossTerm`
            instances, or any callable ``(outputs, targets, indices, num_targets) -> dict`` (its
            keys are checked when it first returns them).
        weight_dict: ``{unsuffixed key: weight}`` for every key the terms produce, e.g.
            ``{"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}``. Suffixed keys
            (``loss_ce_3``, ``loss_ce_s1``) override the weight of one output. Missing weights
            raise ``ValueError`` here (or ``KeyError`` at call time for unchecked callables).
        loss_kwargs: ``{term name: kwargs}`` for terms given by name.
        aux_losses: names of the terms also applied to ``aux_outputs`` (default: all). FastInst:
            everything except ``"proposals"``.
        normalizer: ``"num_targets"`` (Mask2Former/FastInst: all-reduced number of GT objects
            in the batch) or ``"num_matched"`` (mmdet/K-Net/QueryInst: all-reduced number of
            positive, i.e. matched, queries of each output).
        key_style: ``"index"``: final ``loss_x``, aux i ``loss_x_<i>``; ``"stage"``: output s of
            ``[*aux_outputs, final]`` gets ``loss_x_s<s + stage_offset>`` (final included).
        stage_offset: first stage number for ``key_style="stage"``.
        stage_loss_weights: one factor per output of ``[*aux_outputs, final]`` (K-Net/QueryInst
            ``stage_loss_weights``), multiplied into every loss of that output.
        match_previous_stage: K-Net: output s > 0 is matched on output s-1's predictions (the
            loss stays on output s). Output 0 is matched on its ``match_outputs`` entry if any.
        stage_matchers: optional per-output matchers (None = ``matcher``), e.g. K-Net's stage 0
            matched on RPN masks without a class cost.

    Per-output options inside the prediction dicts: ``pred_matching_indices`` (use this
    matching, FastInst GT-guided outputs) and ``match_outputs`` (a prediction dict to match on).
    """

    def __init__(
        self,
        matcher: Callable[..., Indices],
        num_classes: int,
        losses: Sequence[LossSpec],
        weight_dict: Mapping[str, float],
        *,
        loss_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        aux_losses: Sequence[str] | None = None,
        normalizer: str = "num_targets",
        key_style: str = "index",
        stage_offset: int = 0,
        stage_loss_weights: Sequence[float] | None = None,
        match_previous_stage: bool = False,
        stage_matchers: Sequence[Callable[..., Indices] | None] | None = None,
    ):
        super().__init__()
        if normalizer not in ("num_targets", "num_matched"):
            raise ValueError(f"normalizer must be 'num_targets' or 'num_matched': {normalizer!r}")
        if key_style not in ("index", "stage"):
            raise ValueError(f"key_style must be 'index' or 'stage', got {key_style!r}")
        self.matcher = matcher
        self.num_classes = num_classes
        self.terms = [self._build(spec, num_classes, loss_kwargs or {}) for spec in losses]
        if not self.terms:
            raise ValueError("SetCriterion needs at least one loss term")
        names = [_term_name(t) for t in self.terms]
        if aux_losses is None:
            aux_losses = names
        unknown_aux = sorted(set(aux_losses) - set(names))
        if unknown_aux:
            raise ValueError(f"aux_losses {unknown_aux} are not among the losses {names}")
        self.aux_terms = [t for t in self.terms if _term_name(t) in set(aux_losses)]
        self.weight_dict = dict(weight_dict)
        self._check_weights()
        self.normalizer = normalizer
        self.key_style = key_style
        self.stage_offset = stage_offset
        self.stage_loss_weights = None if stage_loss_weights is None else list(stage_loss_weights)
        self.match_previous_stage = match_previous_stage
        self.stage_matchers = None if stage_matchers is None else list(stage_matchers)

    @staticmethod
    def _build(spec: LossSpec, num_classes: int, loss_kwargs: Mapping[str, Mapping[str, Any]]):
        if isinstance(spec, str):
            return build_loss_term(spec, num_classes, **dict(loss_kwargs.get(spec, {})))
        if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
            return build_loss_term(spec[0], num_classes, **dict(spec[1]))
        if callable(spec):
            return spec
        raise TypeError(f"cannot build a loss term from {spec!r}")

    def _check_weights(self) -> None:
        declared: set[str] = set()
        all_declared = True
        for term in self.terms:
            keys = getattr(term, "keys", None)
            if keys is None:
                all_declared = False
                continue
            for key in keys:
                if key not in self.weight_dict:
                    raise ValueError(
                        f"loss key {key!r} of term {_term_name(term)!r} has no weight in "
                        f"weight_dict {sorted(self.weight_dict)} (set it, 0 to disable)"
                    )
                declared.add(key)
        if all_declared:
            for key in self.weight_dict:
                base = re.sub(r"_(\d+|s\d+)$", "", key)
                if key not in declared and base not in declared:
                    raise ValueError(
                        f"weight_dict key {key!r} matches no loss key; produced: {sorted(declared)}"
                    )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, terms={self.terms}, weight_dict={self.weight_dict}, "
            f"normalizer={self.normalizer!r}, key_style={self.key_style!r}"
        )

    def loss_key(self, key: str, output_index: int, num_outputs: int) -> str:
        """Suffixed key of loss ``key`` for output ``output_index`` of ``[*aux, final]``."""
        if self.key_style == "stage":
            return f"{key}_s{output_index + self.stage_offset}"
        return key if output_index == num_outputs - 1 else f"{key}_{output_index}"

    def compute_num_targets(self, targets: Sequence[Mapping[str, Any]], device: torch.device):
        """All-reduced, world-size-averaged, >= 1 number of GT objects (Mask2Former num_masks)."""
        return reduce_normalizer(sum(int(t["labels"].shape[0]) for t in targets), device)

    def get_indices(
        self, outputs_list: Sequence[Mapping[str, Any]], index: int, targets: Sequence[Mapping]
    ) -> Indices:
        """Matching for output ``index`` of ``outputs_list`` (``[*aux, final]``)."""
        outputs = outputs_list[index]
        if outputs.get("pred_matching_indices") is not None:
            fixed = list(outputs["pred_matching_indices"])
            if len(fixed) != len(targets):
                raise ValueError(f"{len(fixed)} fixed matchings for {len(targets)} images")
            return fixed
        match_on = outputs.get("match_outputs")
        if match_on is None and self.match_previous_stage and index > 0:
            match_on = outputs_list[index - 1]
        if match_on is None:
            match_on = outputs
        matcher = self.matcher
        if self.stage_matchers is not None and self.stage_matchers[index] is not None:
            matcher = self.stage_matchers[index]
        return matcher(match_on, targets)

    def forward(
        self,
        outputs: Mapping[str, Any],
        targets: Sequence[Mapping[str, Any]],
        *,
        weighted: bool = True,
    ) -> dict[str, Tensor]:
        """Compute all losses.

        Args:
            outputs: final predictions (``pred_logits`` [B, Q, K], ``pred_masks`` [B, Q, h, w],
                ``pred_boxes`` [B, Q, 4], ...) with optional ``aux_outputs`` (list of dicts).
            targets: B per-image dicts (``labels`` [G], ``masks`` [G, H, W], ``boxes`` [G, 4],
                ``image_size`` (h, w)).
            weighted: False returns the raw losses (for logging); True multiplies weights and
                stage weights.

        Returns:
            ``{suffixed key: 0-d tensor}``.
        """
        final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        outputs_list = [*(outputs.get("aux_outputs") or []), final]
        num_outputs = len(outputs_list)
        self._check_lengths(num_outputs)
        device = _first_device(final)
        shared = None
        if self.normalizer == "num_targets":
            shared = self.compute_num_targets(targets, device)
        losses: dict[str, Tensor] = {}
        for index, out in enumerate(outputs_list):
            indices = self.get_indices(outputs_list, index, targets)
            if shared is None:
                num = reduce_normalizer(sum(int(src.numel()) for src, _ in indices), device)
            else:
                num = shared
            terms = self.terms if index == num_outputs - 1 else self.aux_terms
            stage_w = 1.0 if self.stage_loss_weights is None else self.stage_loss_weights[index]
            for term in terms:
                if isinstance(term, LossTerm):
                    term.check_outputs(out)
                for key, value in term(out, targets, indices, num).items():
                    name = self.loss_key(key, index, num_outputs)
                    if weighted:
                        value = value * (self._weight(key, name) * stage_w)
                    losses[name] = value
        return losses

    def _weight(self, key: str, name: str) -> float:
        if name in self.weight_dict:
            return self.weight_dict[name]
        if key not in self.weight_dict:
            raise KeyError(
                f"loss key {key!r} has no weight in weight_dict {sorted(self.weight_dict)}"
            )
        return self.weight_dict[key]

    def _check_lengths(self, num_outputs: int) -> None:
        for what, seq in (
            ("stage_loss_weights", self.stage_loss_weights),
            ("stage_matchers", self.stage_matchers),
        ):
            if seq is not None and len(seq) != num_outputs:
                raise ValueError(
                    f"{what} has {len(seq)} entries but there are {num_outputs} outputs "
                    "(aux_outputs + final)"
                )


def _term_name(term: Any) -> str:
    return str(getattr(term, "name", getattr(term, "__name__", type(term).__name__)))


def _first_device(outputs: Mapping[str, Any]) -> torch.device:
    for value in outputs.values():
        if isinstance(value, Tensor):
            return value.device
    return torch.device("cpu")
