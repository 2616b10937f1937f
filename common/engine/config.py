"""Building a config: Detectron2's defaults, QuerySeg's shared keys and every project's keys.

- :func:`get_cfg` returns Detectron2's config with the common keys
  (:func:`common.engine.defaults.add_common_config`) and the keys of every installed project
  (:func:`common.engine.projects.load_projects`).
- :func:`merge_config` merges a YAML and ``KEY VALUE`` overrides, turning a misspelt key into an
  error that names the file and suggests the closest existing key.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
import yaml
from detectron2.config import CfgNode
from detectron2.config import get_cfg as _d2_get_cfg

from common.engine.config_guard import track_reads
from common.engine.defaults import add_common_config
from common.engine.finalize import explicit_keys, finalize_config
from common.engine.projects import load_projects

logger = logging.getLogger(__name__)


def get_cfg() -> CfgNode:
    """Detectron2's default config plus QuerySeg's common keys and every project's keys."""
    cfg = _d2_get_cfg()
    add_common_config(cfg)
    for project in load_projects():
        project.add_config(cfg)
    return cfg


def _all_keys(cfg: CfgNode, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, CfgNode):
            keys.extend(_all_keys(v, full + "."))
    return keys


def _explain_key_error(cfg: CfgNode, err: Exception, source: str) -> KeyError:
    msg = str(err.args[0]) if err.args else str(err)
    if "Non-existent" not in msg:
        return err if isinstance(err, KeyError) else KeyError(f"{source}: {msg}")
    bad = msg.split(":")[-1].strip().strip("'\"")
    close = difflib.get_close_matches(bad, _all_keys(cfg), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return KeyError(f"{source}: unknown config key {bad}{hint}")


def _origin_of(err: Exception, origins: dict[str, str], default: str) -> str:
    """The file of the chain that sets the key a yacs error message ends with."""
    msg = str(err.args[0]) if err.args else str(err)
    key = msg.rsplit(":", 1)[-1].strip().strip("'\"")
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return default


def _deep_update(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def load_yaml_with_bases(path: str, origins: dict[str, str] | None = None) -> dict[str, Any]:
    """Load a YAML config and its ``_BASE_`` chain into one plain dict.

    ``_BASE_`` may be one path or a list of paths (relative to the file), merged in order, then
    the file itself on top. A list lets a leaf combine a method base with a dataset overlay,
    e.g. ``_BASE_: [../Base-KNet.yaml, ../../../../common/configs/Shapes-Instance.yaml]``.

    ``origins``, when given, receives ``{"A.B.C": file}``: the file of the chain whose value of
    each key wins, so that a bad key or value is reported against the file that holds it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config file must hold a mapping, got {type(raw).__name__}")
    bases = raw.pop("_BASE_", None)
    if bases is None:
        if origins is not None:
            origins.update(dict.fromkeys(_flat_keys(raw), path))
        return raw
    merged: dict[str, Any] = {}
    for ref in [bases] if isinstance(bases, str) else bases:
        base = os.path.expanduser(str(ref))
        if not os.path.isabs(base):
            base = os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base):
            raise FileNotFoundError(f"{path}: _BASE_ {ref} not found (looked for {base})")
        base_origins: dict[str, str] | None = {} if origins is not None else None
        _deep_update(merged, load_yaml_with_bases(base, base_origins))
        if origins is not None:  # later bases win, as in the merge
            origins.update(base_origins)
    if origins is not None:  # the file's own keys win over its bases
        origins.update(dict.fromkeys(_flat_keys(raw), path))
    return _deep_update(merged, raw)


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(f"{prefix}{k}")
        if isinstance(v, dict):
            out.extend(_flat_keys(v, f"{prefix}{k}."))
    return out


def merge_config(
    cfg: CfgNode,
    config_file: str | None,
    opts: list[str] | None,
    finalize: bool = True,
    tool_keys: Iterable[str] = (),
) -> CfgNode:
    """Merge ``config_file`` (with its ``_BASE_`` chain) then ``opts`` into ``cfg``, with errors
    that name the file and the bad key, then (``finalize``) resolve the derived keys
    (``MODEL.TASK``, ``MODEL.NUM_CLASSES`` and what follows from them:
    :func:`common.engine.finalize.finalize_config`); the keys the file chain or ``opts`` set
    count as explicit. The returned config records the keys read from it
    (:func:`common.engine.config_guard.track_reads`) for
    :func:`common.engine.config_guard.check_config_use`; ``tool_keys`` are overrides a tool
    forces on every config (e.g. the benchmark's settings), not the user's: that check ignores
    them."""
    loaded: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if config_file:
        loaded = load_yaml_with_bases(config_file, origins)
        version = loaded.get("VERSION", cfg.VERSION)
        if version != cfg.VERSION:
            raise ValueError(
                f"{origins.get('VERSION', config_file)}: VERSION {version} != {cfg.VERSION}"
            )
        try:
            cfg.merge_from_other_cfg(CfgNode(loaded))
        except KeyError as e:
            raise _explain_key_error(cfg, e, _origin_of(e, origins, config_file)) from None
        except ValueError as e:  # yacs: "Type mismatch (...) for config key: A.B"
            raise ValueError(f"{_origin_of(e, origins, config_file)}: {e}") from None
    if opts:
        if len(opts) % 2:
            raise ValueError(f"overrides must be KEY VALUE pairs, got an odd list: {opts}")
        try:
            cfg.merge_from_list(list(opts))
        except (KeyError, AssertionError) as e:
            raise _explain_key_error(cfg, e, "command-line override") from None
        except ValueError as e:
            raise ValueError(f"command-line override: {e}") from None
    explicit = explicit_keys(loaded, opts or ())
    origins.update(dict.fromkeys((str(k) for k in (opts or ())[0::2]), "the command line"))
    # from here on, what reads the config is recorded (common.engine.config_guard)
    skip = set(tool_keys)
    track_reads(cfg, explicit - skip, origins, leaf=config_file)
    if finalize:
        finalize_config(cfg, explicit)
    if cfg.SOLVER.AMP.ENABLED and not torch.cuda.is_available():
        logger.warning("SOLVER.AMP.ENABLED is set but CUDA is absent: training in fp32 on the CPU")
        cfg.SOLVER.AMP.ENABLED = False
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE.startswith("cuda"):
        cfg.MODEL.DEVICE = "cpu"
    return cfg
