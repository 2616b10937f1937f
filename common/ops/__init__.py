"""QuerySeg's kernels: deformable attention and convolution, each a C++/CUDA op with a
pure-PyTorch fallback, and nothing else.

- ``common.ops.ms_deform_attn``: ``MSDeformAttn`` and ``ms_deform_attn`` (not re-exported here,
  so that the submodule name stays importable and patchable);
- ``common.ops.deform_conv``: ``DeformConv``/``ModulatedDeformConv`` (Detectron2's signatures);
  ``patch_detectron2`` is called by ``common.engine.launch.setup_queryseg``, never on import;
- ``common.ops.build``: the compiled kernels.
"""

from .deform_conv import DeformConv, ModulatedDeformConv, deform_conv2d
from .ms_deform_attn import MSDeformAttn, ms_deform_attn_pytorch

__all__ = [
    "DeformConv",
    "ModulatedDeformConv",
    "deform_conv2d",
    "MSDeformAttn",
    "ms_deform_attn_pytorch",
]
