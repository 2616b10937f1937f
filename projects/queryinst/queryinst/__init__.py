"""QueryInst (ICCV 2021) as a Detectron2 meta-architecture (``META_ARCHITECTURE: QueryInst``)."""

from .config import add_queryinst_config, finalize_queryinst_config
from .queryinst import QueryInst
from .vis import QueryInstVIS

__all__ = ["add_queryinst_config", "finalize_queryinst_config", "QueryInst", "QueryInstVIS"]
