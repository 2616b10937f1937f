"""QueryInst (ICCV 2021) as a Detectron2 meta-architecture (``META_ARCHITECTURE: QueryInst``)."""

from .config import add_queryinst_config, finalize_queryinst_config
from .queryinst import QueryInst

__all__ = ["add_queryinst_config", "finalize_queryinst_config", "QueryInst"]
