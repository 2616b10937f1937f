"""QueryInst for online video instance segmentation (``META_ARCHITECTURE: QueryInstVIS``).

Provenance: the QueryInst paper (Fang et al., ICCV 2021) represents "categories, bounding boxes,
instance masks, and instance association embeddings" by the same queries and evaluates online
VIS on YouTube-VIS; its VIS code was never released (hustvl/QueryInst issues #11, #19). What is
ours (see the README, "Video instance segmentation"): the queries are carried from frame to frame
(frame t starts from frame t-1's last-stage boxes and object features, frame 0 from the learned
proposals); a tracking head (an MLP on each query's last-stage object feature) gives the
association embedding, trained and used as MaskTrack R-CNN's tracking branch is: a cross-entropy
over "new" plus the previous frame's matched instances in training, and at inference an online
memory of tracks matched by embedding softmax + detection score + box IoU + class agreement.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, Instances, pairwise_iou
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .queryinst import QueryInst

__all__ = ["OnlineTracker", "QueryInstVIS", "TrackHead", "association_loss"]


class TrackHead(nn.Module):
    """Association embedding of each query: ``num_fcs`` x [Linear, ReLU] then Linear.

    Args:
        in_channels: query channels C; embed_dim: output width E; num_fcs: hidden layers.
    """

    def __init__(self, in_channels: int, embed_dim: int, num_fcs: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(num_fcs):
            layers += [nn.Linear(in_channels, in_channels), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(in_channels, embed_dim))
        self.fcs = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., C] -> [..., E]."""
        return self.fcs(x)


def association_loss(
    cur_embeds: Tensor, cur_ids: Tensor, prev_embeds: Tensor, prev_ids: Tensor
) -> tuple[Tensor, int]:
    """MaskTrack R-CNN's association loss for one clip and one pair of frames.

    Each matched instance of the current frame is classified among "new" (logit 0) and the
    matched instances of the previous frame (logit = embedding dot product); the target is the
    previous instance with the same track id, else "new".

    Args:
        cur_embeds: [M, E] embeddings of the current frame's matched queries; cur_ids: [M].
        prev_embeds: [P, E] and prev_ids: [P] of the previous frame.

    Returns:
        (summed cross-entropy, M).
    """
    if cur_embeds.shape[0] == 0:
        return cur_embeds.sum() * 0.0, 0
    logits = torch.cat([cur_embeds.new_zeros((len(cur_embeds), 1)), cur_embeds @ prev_embeds.T], 1)
    same = cur_ids[:, None] == prev_ids[None, :]  # [M, P]
    target = torch.zeros_like(cur_ids)
    if same.shape[1]:
        target = torch.where(same.any(1), same.float().argmax(1) + 1, target)
    return F.cross_entropy(logits, target, reduction="sum"), len(cur_ids)


class OnlineTracker:
    """Online association of per-frame detections to a memory of tracks (MaskTrack R-CNN).

    For detection i and track j: ``log softmax([0, e_i . m_j ...])_j + det_w * log(s_i) +
    iou_w * IoU(b_i, b_j) + label_w * [c_i == c_j]``, against ``log softmax(...)_new`` for a new
    track; one-to-one by the Hungarian algorithm, a pair kept only where it beats "new". Matched
    tracks take the detection's embedding, box and class; tracks are never dropped (an object
    may come back).
    """

    def __init__(self, det_score_weight: float, iou_weight: float, label_weight: float):
        self.weights = (det_score_weight, iou_weight, label_weight)
        self.embeds: Tensor | None = None  # [M, E]
        self.boxes: Tensor | None = None  # [M, 4]
        self.labels: Tensor | None = None  # [M]
        self.ids: list[int] = []
        self.next_id = 1

    def update(self, embeds: Tensor, boxes: Tensor, labels: Tensor, scores: Tensor) -> Tensor:
        """Assign track ids to one frame's detections.

        Args:
            embeds: [D, E]; boxes: [D, 4] xyxy; labels: [D]; scores: [D] in (0, 1].

        Returns:
            [D] long track ids (>= 1), distinct within the frame.
        """
        n = len(embeds)
        ids = torch.zeros(n, dtype=torch.long)
        assigned: dict[int, int] = {}
        if self.embeds is not None and n and len(self.ids):
            det_w, iou_w, label_w = self.weights
            sim = embeds @ self.embeds.T
            logp = torch.cat([sim.new_zeros((n, 1)), sim], 1).log_softmax(1)
            match = (
                logp[:, 1:]
                + det_w * scores.clamp(min=1e-6).log()[:, None]
                + iou_w * pairwise_iou(Boxes(boxes), Boxes(self.boxes))
                + label_w * (labels[:, None] == self.labels[None, :]).float()
            )
            rows, cols = linear_sum_assignment(-match.cpu().numpy())
            for i, j in zip(rows.tolist(), cols.tolist()):
                if match[i, j] > logp[i, 0]:
                    assigned[i] = j
        for i in range(n):
            if i in assigned:
                j = assigned[i]
                ids[i] = self.ids[j]
                self.embeds[j], self.boxes[j], self.labels[j] = embeds[i], boxes[i], labels[i]
            else:
                ids[i] = self.next_id
                self.ids.append(self.next_id)
                self.next_id += 1
                if self.embeds is None:
                    self.embeds, self.boxes, self.labels = (
                        embeds[i : i + 1],
                        boxes[i : i + 1],
                        labels[i : i + 1],
                    )
                else:
                    self.embeds = torch.cat([self.embeds, embeds[i : i + 1]])
                    self.boxes = torch.cat([self.boxes, boxes[i : i + 1]])
                    self.labels = torch.cat([self.labels, labels[i : i + 1]])
        return ids


@META_ARCH_REGISTRY.register()
class QueryInstVIS(QueryInst):
    """QueryInst with queries carried across frames and a tracking head (online VIS).

    Training input: per clip, ``images`` (T frames) and ``instances`` (T Instances with
    ``gt_ids``), from the ``video_instance`` mapper; returns QueryInst's losses averaged over
    the frames plus ``loss_track``. Inference input: per video, ``images`` (every frame);
    returns ``[{"frames": [Instances per frame with pred_boxes, scores, pred_classes,
    pred_masks, track_ids]}]`` at the requested ``height``/``width``.
    """

    #: an image QueryInst checkpoint initialises it (the paper starts VIS from its COCO model);
    #: the tracking head then starts fresh (``common.engine.checkpoint.QSCheckpointer``)
    initialises_from = {"QueryInst": ("track_head.",)}

    @configurable
    def __init__(
        self,
        *,
        track_head: TrackHead,
        track_weight: float,
        score_thresh: float,
        match_weights: tuple[float, float, float],
        **kwargs,
    ):
        """
        Args:
            track_head: the association embedding head on the last stage's object features.
            track_weight: weight of ``loss_track``.
            score_thresh: a query is a detection when its best class score reaches this.
            match_weights: (det score, box IoU, label) weights of :class:`OnlineTracker`.
            kwargs: :class:`QueryInst`'s arguments.
        """
        super().__init__(**kwargs)
        self.track_head = track_head
        self.track_weight = track_weight
        self.score_thresh = score_thresh
        self.match_weights = tuple(match_weights)

    @classmethod
    def from_config(cls, cfg) -> dict[str, Any]:
        ret = QueryInst.from_config(cfg)
        v = cfg.MODEL.QUERYINST.VIS
        dim = ret["roi_head"].bbox_head[0].in_channels
        ret.update(
            track_head=TrackHead(dim, v.EMBED_DIM, v.NUM_FCS),
            track_weight=v.TRACK_WEIGHT,
            score_thresh=v.SCORE_THRESH,
            match_weights=(
                v.MATCH_DET_SCORE_WEIGHT,
                v.MATCH_IOU_WEIGHT,
                v.MATCH_LABEL_WEIGHT,
            ),
        )
        return ret

    @staticmethod
    def carry(boxes: Tensor, image_whwh: Tensor) -> Tensor:
        """Boxes [B, N, 4] handed to the next frame: detached, clipped to the image, >= 1 px."""
        boxes = boxes.detach()
        x0, y0, x1, y1 = boxes.unbind(-1)
        w, h = image_whwh[:, None, 0], image_whwh[:, None, 1]
        x0, y0 = torch.minimum(x0.clamp(min=0), w - 1), torch.minimum(y0.clamp(min=0), h - 1)
        x1, y1 = (
            torch.minimum(torch.maximum(x1, x0 + 1), w),
            torch.minimum(torch.maximum(y1, y0 + 1), h),
        )
        return torch.stack([x0, y0, x1, y1], -1)

    def forward(self, batched_inputs: list[dict[str, Any]]):
        if self.training:
            return self.forward_clips(batched_inputs)
        return [self.inference_video(x) for x in batched_inputs]

    # ---- training ----------------------------------------------------------------------------
    def forward_clips(self, clips: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Frames 0..T-1 of every clip in turn: frame 0 from the learned proposals, frame t from
        frame t-1's last-stage boxes and object features (detached); QueryInst's losses on every
        frame (averaged) and the association loss between consecutive frames."""
        num_frames = {len(c["images"]) for c in clips}
        if len(num_frames) != 1 or any("instances" not in c for c in clips):
            raise ValueError(
                "QueryInstVIS training needs clips of equal length with 'images' and "
                f"'instances' (the video_instance mapper); got lengths {sorted(num_frames)}"
            )
        t_len, b = num_frames.pop(), len(clips)
        flat = [{"image": c["images"][t]} for t in range(t_len) for c in clips]
        images = self.preprocess_image(flat)
        features = self.roi_head.select_features(self.backbone(images.tensor))
        losses: dict[str, Tensor] = {}
        track_sum, track_n = None, 0
        prev = None
        for t in range(t_len):
            sl = slice(t * b, (t + 1) * b)
            feats = [f[sl] for f in features]
            sizes = images.image_sizes[sl]
            whwh = torch.tensor(
                [[w, h, w, h] for h, w in sizes], dtype=torch.float32, device=self.device
            )
            if prev is None:
                boxes, queries = self.rpn_head(whwh)
            else:
                boxes, queries = (
                    self.carry(prev[0]["pred_boxes"], whwh),
                    prev[0]["object_features"].detach(),
                )
            targets = self.prepare_targets([{"instances": c["instances"][t]} for c in clips], sizes)
            ids = [c["instances"][t].gt_ids.to(self.device) for c in clips]
            outputs, last = self.train_stages(feats, boxes, queries, targets)
            for k, v in self.criterion(outputs, targets).items():
                losses[k] = losses.get(k, 0.0) + v / t_len
            embeds = self.track_head(last["object_features"])  # [B, N, E]
            indices = outputs["pred_matching_indices"]
            if prev is not None:
                for i in range(b):
                    (q_cur, g_cur), (q_prev, g_prev) = indices[i], prev[2][i]
                    loss, n = association_loss(
                        embeds[i, q_cur.to(self.device)],
                        ids[i][g_cur.to(self.device)],
                        prev[1][i, q_prev.to(self.device)],
                        prev[3][i][g_prev.to(self.device)],
                    )
                    track_sum = loss if track_sum is None else track_sum + loss
                    track_n += n
            prev = (last, embeds, indices, ids)
        if track_sum is None:  # one-frame clips: keep the head in the graph (DDP)
            track_sum = sum(p.sum() for p in self.track_head.parameters()) * 0.0
        losses["loss_track"] = self.track_weight * track_sum / max(track_n, 1)
        return losses

    # ---- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def inference_video(self, video: dict[str, Any]) -> dict[str, list[Instances]]:
        """Run one video online, frame by frame, carrying the queries and the track memory."""
        tracker = OnlineTracker(*self.match_weights)
        frames, boxes, queries = [], None, None
        for image in video["images"]:
            frame_input = {"image": image}
            images = self.preprocess_image([frame_input])
            features = self.roi_head.select_features(self.backbone(images.tensor))
            h, w = images.image_sizes[0]
            whwh = torch.tensor([[w, h, w, h]], dtype=torch.float32, device=self.device)
            if boxes is None:
                boxes, queries = self.rpn_head(whwh)
            for stage in range(self.roi_head.num_stages):
                out = self.roi_head.box_stage(stage, features, boxes, queries)
                boxes, queries = out["pred_boxes"], out["object_features"]
            frames.append(self._frame_detections(video, images, features, out, tracker))
            boxes = self.carry(boxes, whwh)
        return {"frames": frames}

    def _frame_detections(self, video, images, features, out, tracker) -> Instances:
        scores, labels = out["pred_logits"][0].sigmoid().max(1)  # [N]
        keep = (scores >= self.score_thresh).nonzero().flatten()
        keep = keep[scores[keep].argsort(descending=True)][: self.test_topk]
        boxes = out["pred_boxes"][0, keep]
        logits = self.roi_head.mask_stage(
            self.roi_head.num_stages - 1, features, [boxes], out["attn_features"][0, keep]
        )
        probs = logits[torch.arange(len(keep), device=self.device), labels[keep]].sigmoid()
        height = video.get("height", images.image_sizes[0][0])
        width = video.get("width", images.image_sizes[0][1])
        inst = self.postprocess(
            boxes, scores[keep], labels[keep], probs, images.image_sizes[0], (height, width)
        )
        embeds = self.track_head(out["object_features"][0, keep])
        inst.track_ids = tracker.update(
            embeds.cpu(), boxes.cpu(), labels[keep].cpu(), scores[keep].cpu()
        )
        return inst
