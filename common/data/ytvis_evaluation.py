"""Video instance segmentation evaluation: YouTube-VIS video AP/AR of mask tubes.

The metric is the one the YouTube-VIS cocoapi fork (``youtubevos/cocoapi``, ``YTVOSeval``)
defines: a prediction is one *track* (a category, a score and a mask per frame, absent frames
empty); the IoU of a predicted and a ground-truth track is the sum over frames of their
intersections over the sum over frames of their unions (a frame where only one is present adds
its area to the union); with this IoU matrix, COCO's matching, precision/recall accumulation and
summary run unchanged: AP at IoU 0.50:0.95, AP50, AP75, AP for small / medium / large tracks (by
the mean area over the frames where present; YouTube-VIS splits at 128^2 and 256^2 px), and AR
with at most 1 / 10 / 100 tracks per video. Here pycocotools' :class:`COCOeval` does all of that,
fed with the tube IoU matrix (:class:`VideoCOCOeval`); the code is our own.

Beyond the benchmark, :func:`count_id_switches` counts identity switches (CLEAR-MOT style, per
frame one-to-one matching at mask IoU >= 0.5 among tracks scoring >= a threshold).
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import logging
import os
from collections import OrderedDict, defaultdict
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from pycocotools.cocoeval import COCOeval
from scipy.optimize import linear_sum_assignment

logger = logging.getLogger(__name__)

__all__ = [
    "VideoCOCOeval",
    "YTVISEvaluator",
    "count_id_switches",
    "evaluate_tracks",
    "frames_to_tracks",
    "tube_iou",
]

#: YouTube-VIS area ranges (mean track area): all, small < 128^2, medium < 256^2, large.
YTVIS_AREA_RANGES = [[0, 1e5**2], [0, 128**2], [128**2, 256**2], [256**2, 1e5**2]]
_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def tube_iou(dt: list[dict | None], gt: list[dict | None]) -> float:
    """IoU of two mask tubes: sum of per-frame intersections / sum of per-frame unions.

    Args:
        dt, gt: one RLE (or None where absent) per frame, equally long.
    """
    if len(dt) != len(gt):
        raise ValueError(f"tube_iou: tubes of {len(dt)} and {len(gt)} frames")
    inter = union = 0.0
    for d, g in zip(dt, gt):
        if d is not None and g is not None:
            inter += float(mask_util.area(mask_util.merge([d, g], intersect=True)))
            union += float(mask_util.area(mask_util.merge([d, g], intersect=False)))
        elif d is not None:
            union += float(mask_util.area(d))
        elif g is not None:
            union += float(mask_util.area(g))
    return inter / union if union > 0 else 0.0


def _mean_area(segmentations: list[dict | None]) -> float:
    areas = [float(mask_util.area(s)) for s in segmentations if s is not None]
    return float(np.mean(areas)) if areas else 0.0


class VideoCOCOeval(COCOeval):
    """pycocotools' COCOeval over videos instead of images and tracks instead of instances.

    ``imgIds`` are video ids. Each track: ``video_id``, ``category_id``, ``segmentations`` (RLE
    or None per frame), ``score`` (predictions), ``iscrowd`` (ground truth; optional).
    ``computeIoU`` returns the tube IoU matrix; everything else is COCOeval's.
    """

    def __init__(self, gt_tracks: list[dict], dt_tracks: list[dict], video_ids, cat_ids):
        super().__init__(iouType="segm")
        self.params.imgIds = sorted(video_ids)
        self.params.catIds = sorted(cat_ids)
        self.params.areaRng = copy.deepcopy(YTVIS_AREA_RANGES)
        self._gt_tracks = [
            dict(t, id=i + 1, area=_mean_area(t["segmentations"]), iscrowd=t.get("iscrowd", 0))
            for i, t in enumerate(gt_tracks)
        ]
        self._dt_tracks = [
            dict(t, id=i + 1, area=_mean_area(t["segmentations"]), iscrowd=0)
            for i, t in enumerate(dt_tracks)
        ]

    def _prepare(self) -> None:
        self._gts, self._dts = defaultdict(list), defaultdict(list)
        for g in self._gt_tracks:
            g["ignore"] = int(bool(g["iscrowd"]))
            self._gts[g["video_id"], g["category_id"]].append(g)
        for d in self._dt_tracks:
            self._dts[d["video_id"], d["category_id"]].append(d)
        self.evalImgs = defaultdict(list)
        self.eval = {}

    def computeIoU(self, imgId, catId):  # noqa: N802  (COCOeval's name)
        p = self.params
        if p.useCats:
            gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        else:
            gt = [g for c in p.catIds for g in self._gts[imgId, c]]
            dt = [d for c in p.catIds for d in self._dts[imgId, c]]
        if not gt and not dt:
            return []
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")
        dt = [dt[i] for i in order][: p.maxDets[-1]]
        ious = np.zeros((len(dt), len(gt)))
        for i, j in np.ndindex(ious.shape):
            ious[i, j] = tube_iou(dt[i]["segmentations"], gt[j]["segmentations"])
        return ious


def evaluate_tracks(
    gt_tracks: list[dict], dt_tracks: list[dict], video_ids, cat_ids
) -> dict[str, float]:
    """Video AP/AR (in %, as Detectron2 reports COCO) of ``dt_tracks`` against ``gt_tracks``.

    Returns:
        AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100 (NaN where no ground truth counts).
    """
    if not gt_tracks:
        raise ValueError("evaluate_tracks: no ground-truth tracks to evaluate against")
    ev = VideoCOCOeval(gt_tracks, dt_tracks, video_ids, cat_ids)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # pycocotools prints its progress and summary
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    logger.info("video AP (YouTube-VIS):\n" + out.getvalue())
    return {
        name: float(v * 100) if v >= 0 else float("nan")
        for name, v in zip(_STAT_NAMES, ev.stats[: len(_STAT_NAMES)])
    }


def count_id_switches(
    gt_tracks: list[dict], dt_tracks: list[dict], score_thresh: float = 0.5, iou: float = 0.5
) -> tuple[int, int]:
    """Identity switches of ``dt_tracks`` on ``gt_tracks`` (one video or many).

    In every frame, the ground-truth instances and the predicted tracks present there with score
    >= ``score_thresh`` are matched one to one (Hungarian on mask IoU, pairs >= ``iou``); a switch
    is a ground-truth track matched to a different predicted track than at its previous match.

    Returns:
        (switches, matched ground-truth frames).
    """
    switches = matched = 0
    videos = sorted({t["video_id"] for t in gt_tracks})
    for vid in videos:
        gts = [t for t in gt_tracks if t["video_id"] == vid]
        dts = [t for t in dt_tracks if t["video_id"] == vid and t["score"] >= score_thresh]
        last: dict[int, int] = {}
        for f in range(len(gts[0]["segmentations"])):
            g_idx = [i for i, t in enumerate(gts) if t["segmentations"][f] is not None]
            d_idx = [i for i, t in enumerate(dts) if t["segmentations"][f] is not None]
            if not g_idx or not d_idx:
                continue
            ious = mask_util.iou(
                [dts[i]["segmentations"][f] for i in d_idx],
                [gts[i]["segmentations"][f] for i in g_idx],
                [0] * len(g_idx),
            )
            rows, cols = linear_sum_assignment(-ious)
            for r, c in zip(rows, cols):
                if ious[r, c] < iou:
                    continue
                g, d = g_idx[c], d_idx[r]
                matched += 1
                if g in last and last[g] != d:
                    switches += 1
                last[g] = d
    return switches, matched


def frames_to_tracks(frames: list, video_id: Any, contiguous_to_id: dict[int, int]) -> list[dict]:
    """Turn a model's per-frame output into YouTube-VIS result tracks.

    Args:
        frames: one Detectron2 ``Instances`` per frame with ``track_ids`` [D], ``scores`` [D],
            ``pred_classes`` [D] (contiguous) and ``pred_masks`` [D, H, W].
        contiguous_to_id: contiguous class -> dataset category id.

    Returns:
        one dict per track id: ``video_id``, ``category_id`` (the class with the highest summed
        score over its frames), ``score`` (mean over the frames where present), ``segmentations``
        (RLE or None per frame), ``track_id``.
    """
    per_track: dict[int, dict] = {}
    n = len(frames)
    for f, inst in enumerate(frames):
        inst = inst.to("cpu")
        masks = inst.pred_masks.numpy().astype(np.uint8)
        for k, tid in enumerate(inst.track_ids.tolist()):
            t = per_track.setdefault(
                tid, {"segmentations": [None] * n, "scores": [], "votes": defaultdict(float)}
            )
            if t["segmentations"][f] is not None:
                raise ValueError(f"frames_to_tracks: track id {tid} twice in frame {f}")
            rle = mask_util.encode(np.asfortranarray(masks[k]))
            rle["counts"] = rle["counts"].decode("ascii")
            t["segmentations"][f] = rle
            score = float(inst.scores[k])
            t["scores"].append(score)
            t["votes"][int(inst.pred_classes[k])] += score
    tracks = []
    for tid, t in sorted(per_track.items()):
        label = max(t["votes"].items(), key=lambda kv: kv[1])[0]
        tracks.append(
            {
                "video_id": video_id,
                "category_id": contiguous_to_id[label],
                "score": float(np.mean(t["scores"])),
                "segmentations": t["segmentations"],
                "track_id": tid,
            }
        )
    return tracks


def _normalise_rle(seg: Any, height: int, width: int) -> dict | None:
    """A JSON segmentation (compressed or uncompressed RLE, or None) as a compressed RLE."""
    if seg is None:
        return None
    if isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        return mask_util.frPyObjects(seg, height, width)
    if isinstance(seg, dict):
        return {"size": seg["size"], "counts": seg["counts"]}
    raise ValueError(f"unsupported segmentation of type {type(seg).__name__} (expected RLE)")


class YTVISEvaluator(DatasetEvaluator):
    """YouTube-VIS 2019 evaluator (video AP of mask tubes) for a ``evaluator_type="ytvis"``
    dataset; its ground truth is read from the dataset's metadata ``json_file``.

    Expects per video an output dict with ``frames``: a list of per-frame ``Instances`` carrying
    ``track_ids`` (see :func:`frames_to_tracks`). Writes ``results.json`` (YouTube-VIS result
    format) to ``output_dir``. Returns ``{"video_segm": {AP, AP50, AP75, APs, APm, APl, AR1,
    AR10, AR100, IDSW, IDSW_frames}}`` (its own key: video AP is not image mask AP); IDSW is
    :func:`count_id_switches` at ``idsw_score_thresh`` and IDSW_frames the ground-truth frames
    it matched (so that few switches can be told from few matches).
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: str | None = None,
        distributed: bool = True,
        idsw_score_thresh: float = 0.3,
    ):
        meta = MetadataCatalog.get(dataset_name)
        self._dataset_name = dataset_name
        self._json_file = meta.json_file
        self._to_id = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
        self._output_dir = output_dir
        self._distributed = distributed
        self._idsw_score_thresh = idsw_score_thresh
        self._predictions: list[dict] = []
        self._videos: list = []

    def reset(self) -> None:
        self._predictions = []
        self._videos = []

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for inp, out in zip(inputs, outputs):
            if "frames" not in out:
                raise KeyError(
                    "YTVISEvaluator needs the model's per-video output {'frames': [Instances with "
                    f"track_ids]}}; got keys {sorted(out)} (is the model a video model?)"
                )
            self._predictions.extend(frames_to_tracks(out["frames"], inp["video_id"], self._to_id))
            self._videos.append(inp["video_id"])

    def _ground_truth(self) -> tuple[list[dict], list, list]:
        with open(self._json_file) as f:
            data = json.load(f)
        videos = {v["id"]: v for v in data["videos"]}
        tracks = []
        for anno in data.get("annotations", []):
            v = videos[anno["video_id"]]
            tracks.append(
                {
                    "video_id": anno["video_id"],
                    "category_id": anno["category_id"],
                    "iscrowd": anno.get("iscrowd", 0),
                    "segmentations": [
                        _normalise_rle(s, v["height"], v["width"]) for s in anno["segmentations"]
                    ],
                }
            )
        return tracks, list(videos), [c["id"] for c in data["categories"]]

    def evaluate(self):
        predictions, videos = self._predictions, self._videos
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(predictions, dst=0)))
            videos = list(itertools.chain(*comm.gather(videos, dst=0)))
            if not comm.is_main_process():
                return {}
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            with open(os.path.join(self._output_dir, "results.json"), "w") as f:
                json.dump(predictions, f)
        gt, video_ids, cat_ids = self._ground_truth()
        if not gt:
            logger.warning(
                f"{self._json_file} holds no annotations (e.g. the YouTube-VIS valid split): "
                "results.json is written for the evaluation server, nothing is scored here"
            )
            return {}
        # score the videos run through the model (all of them in a full evaluation)
        evaluated = set(videos) or set(video_ids)
        gt = [t for t in gt if t["video_id"] in evaluated]
        res = evaluate_tracks(gt, predictions, sorted(evaluated), cat_ids)
        res["IDSW"], res["IDSW_frames"] = count_id_switches(
            gt, predictions, self._idsw_score_thresh
        )
        return OrderedDict(video_segm=res)
