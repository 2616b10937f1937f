"""The Detectron2 baselines (Mask R-CNN) pass the same end-to-end checks as every method."""

from meta_arch_mixin import MetaArchTestMixin


class TestMaskRCNNBaseline(MetaArchTestMixin):
    config_file = "common/configs/baselines/mask_rcnn_R_18_FPN_gn_scratch_shapes.yaml"
    task = "instance"
    expected_loss_keys = {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}
