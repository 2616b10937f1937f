"""FastInst end to end on the CPU for every task (shared mixin), plus the exact loss keys of
every decoder layer and GT-mask-guided pass."""

from __future__ import annotations

from meta_arch_mixin import MetaArchTestMixin

CONFIGS = "projects/fastinst/configs/shapes/"


def fastinst_loss_keys(dec_layers: int, guided: bool = True) -> set[str]:
    """loss_{ce,mask,dice} on the final output, _<i> on the 2L (L without guidance) aux outputs
    (guided passes first, then the initial prediction and layers 0..L-2), and loss_proposal."""
    num_aux = (2 if guided else 1) * dec_layers
    keys = {"loss_proposal"}
    for term in ("loss_ce", "loss_mask", "loss_dice"):
        keys.add(term)
        keys.update(f"{term}_{i}" for i in range(num_aux))
    return keys


class _ExactKeys:
    def test_exact_loss_keys(self, model):
        losses = self._train_step(model, [2, 1])
        assert set(losses) == self.expected_loss_keys


class TestFastInstInstanceD1(_ExactKeys, MetaArchTestMixin):
    config_file = CONFIGS + "fastinst_R18_D1_shapes_instance.yaml"
    task = "instance"
    expected_loss_keys = fastinst_loss_keys(1)


class TestFastInstInstanceD3(_ExactKeys, MetaArchTestMixin):
    config_file = CONFIGS + "fastinst_R18_D1_shapes_instance.yaml"
    task = "instance"
    overrides = ["MODEL.FASTINST.DEC_LAYERS", "3", "MODEL.FASTINST.POS_EMBED", "sine"]
    expected_loss_keys = fastinst_loss_keys(3)


class TestFastInstInstanceNoGuidance(_ExactKeys, MetaArchTestMixin):
    config_file = CONFIGS + "fastinst_R18_D1_shapes_instance.yaml"
    task = "instance"
    overrides = ["MODEL.FASTINST.DEC_LAYERS", "2", "MODEL.FASTINST.GT_MASK_GUIDED", "False"]
    expected_loss_keys = fastinst_loss_keys(2, guided=False)


class TestFastInstPanoptic(_ExactKeys, MetaArchTestMixin):
    config_file = CONFIGS + "fastinst_R18_D1_shapes_panoptic.yaml"
    task = "panoptic"
    expected_loss_keys = fastinst_loss_keys(1)


class TestFastInstSemantic(_ExactKeys, MetaArchTestMixin):
    config_file = CONFIGS + "fastinst_R18_D1_shapes_semantic.yaml"
    task = "semantic"
    expected_loss_keys = fastinst_loss_keys(1)
