"""What every QuerySeg meta-architecture shares: normalising and padding the input images, the
padding policy, and the class count (resolved by ``common.engine.finalize``).

Each meta-architecture keeps the Detectron2 skeleton (``forward`` -> ``preprocess_image`` ->
backbone -> head -> criterion / inference) and calls these instead of its own copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from detectron2.structures import ImageList
from torch import Tensor, nn

__all__ = [
    "backbone_size_divisibility",
    "check_images",
    "metadata_class_count",
    "normalize_and_pad",
    "num_classes",
    "padding_multiples",
]


def backbone_size_divisibility(backbone: nn.Module) -> int:
    """The backbone's own padding multiple: Detectron2's ``Backbone.size_divisibility`` (a
    property or a method) when set, else its coarsest output stride (Detectron2's ResNet
    reports 0 although its res5 has stride 32); 0 for a module with neither."""
    div = getattr(backbone, "size_divisibility", 0)
    div = int(div() if callable(div) else div)
    if div > 0:
        return div
    output_shape = getattr(backbone, "output_shape", None)
    if output_shape is None:
        return 0
    return max((int(s.stride or 0) for s in output_shape().values()), default=0)


def padding_multiples(backbone: nn.Module, cfg: Any) -> tuple[int, int]:
    """QuerySeg's one padding policy: (training, test) multiples the batch is zero-padded to,
    ``max(backbone_size_divisibility(backbone), INPUT.SIZE_DIVISIBILITY[_TEST], 1)``, where
    ``INPUT.SIZE_DIVISIBILITY_TEST`` -1 means ``INPUT.SIZE_DIVISIBILITY``."""
    base = backbone_size_divisibility(backbone)
    train = int(cfg.INPUT.SIZE_DIVISIBILITY)
    test = int(cfg.INPUT.get("SIZE_DIVISIBILITY_TEST", -1))
    test = train if test < 0 else test
    return max(base, train, 1), max(base, test, 1)


def num_classes(cfg: Any) -> int:
    """``MODEL.NUM_CLASSES`` as ``common.engine.finalize`` resolved it; ``ValueError`` when it
    is still -1 (no config set it and the training set's metadata does not list the classes)."""
    n = int(cfg.MODEL.NUM_CLASSES)
    if n < 0:
        data = ", ".join(cfg.DATASETS.TRAIN) or "none"
        raise ValueError(
            f"MODEL.NUM_CLASSES is -1 (derive) but the training set ({data}) lists no classes "
            f"for MODEL.TASK={cfg.MODEL.TASK!r}: set MODEL.NUM_CLASSES (a config built without "
            "merge_config needs common.engine.finalize.finalize_config(cfg))"
        )
    return n


def check_images(batched_inputs: Sequence[dict[str, Any]], channels: int, model: str) -> None:
    """Raise ``ValueError`` naming ``model`` and the input for anything that is not a
    [C, H, W] image tensor with C = ``channels`` (= len(MODEL.PIXEL_MEAN))."""
    for i, x in enumerate(batched_inputs):
        image = x.get("image")
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != channels:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(
                f"{model} expects images [{channels}, H, W]: input {i}: 'image' must be a "
                f"[{channels}, H, W] tensor (MODEL.PIXEL_MEAN has {channels} values), got {shape}"
            )


def normalize_and_pad(
    batched_inputs: Sequence[dict[str, Any]],
    pixel_mean: Tensor,
    pixel_std: Tensor,
    size_divisibility: int,
    model: str,
) -> ImageList:
    """``(image - pixel_mean) / pixel_std`` on the buffers' device, zero-padded to a multiple of
    ``size_divisibility`` (0: to the largest image only).

    Args:
        batched_inputs: Detectron2 input dicts; ``image`` [C, H, W] (any dtype, any device).
        pixel_mean, pixel_std: [C, 1, 1] buffers of the model.
        size_divisibility: the padding multiple, see :func:`backbone_size_divisibility`.
        model: the meta-architecture's name, for the error message.

    Returns:
        ImageList: tensor [B, C, H_pad, W_pad] and the unpadded ``image_sizes``.
    """
    check_images(batched_inputs, pixel_mean.shape[0], model)
    device = pixel_mean.device
    images = [(x["image"].to(device) - pixel_mean) / pixel_std for x in batched_inputs]
    return ImageList.from_tensors(images, size_divisibility)


def metadata_class_count(metadata: Any, field: str) -> int:
    """Number of classes a dataset's metadata lists in ``field`` (0 when absent).

    ``thing_classes`` is counted by ``thing_dataset_id_to_contiguous_id`` when present
    (Detectron2's standard COCO panoptic metadata lists all 133 names in ``thing_classes``).
    """
    if field == "thing_classes":
        id_map = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
        if id_map:
            return len(id_map)
    return len(getattr(metadata, field, None) or [])
