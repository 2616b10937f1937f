"""QuerySeg's shared modeling parts.

- ``matcher`` + ``costs``: one Hungarian matcher with a registry of named cost terms;
- ``criterion`` + ``loss_terms`` + ``losses``: the set criterion, its registry of loss terms and
  the loss functions; ``point_sampling``, ``position_encoding``: helpers;
- ``backbones``: ResNet-vd / Swin (``BACKBONE_REGISTRY``); pixel decoders
  (``SEM_SEG_HEADS_REGISTRY``): ``pixel_decoder`` (the MSDeformAttn one) and ``ppm_fpn`` (the
  PPM-FPN ``PyramidPoolingModuleFPN`` and plain ``BaseFPN``); ``neck``: any such pixel decoder as
  a method's feature neck (``PixelDecoderNeck``, used by ``MODEL.KNET.NECK``);
- ``meta_arch``: what every meta-architecture shares (normalise + pad, class-count check).

Importing this package registers the backbones and the pixel decoders.
"""

from . import backbones, pixel_decoder, ppm_fpn  # noqa: F401  (registers builders)
