"""What every QuerySeg meta-architecture shares: normalising and padding the input images, the
padding policy, and the class-count check against the dataset's metadata.

Each meta-architecture keeps the Detectron2 skeleton (``forward`` -> ``preprocess_image`` ->
backbone -> head -> criterion / inference) and calls these instead of its own copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from detectron2.data import MetadataCatalog
from detectron2.structures import ImageList
from torch import Tensor, nn

__all__ = [
    "backbone_size_divisibility",
    "check_images",
    "check_num_classes",
    "metadata_class_count",
    "normalize_and_pad",
]


def backbone_size_divisibility(backbone: nn.Module) -> int:
    """The backbone's own padding multiple (Detectron2's ``Backbone.size_divisibility``, a
    property or a method; 0 when it has none)."""
    div = getattr(backbone, "size_divisibility", 0)
    return int(div() if callable(div) else div)


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


def check_num_classes(cfg: Any, key: str, num_classes: int, field: str = "thing_classes") -> None:
    """Raise ``ValueError`` when the class count under config ``key`` disagrees with ``field``
    (``thing_classes`` / ``stuff_classes``) of the first training set's metadata; silent when
    there is no training set or its metadata has no such list."""
    for name in cfg.DATASETS.TRAIN[:1]:
        count = metadata_class_count(MetadataCatalog.get(name), field)
        if count and count != num_classes:
            raise ValueError(f"{key}={num_classes} but dataset {name!r} has {count} {field}")
