"""COCO evaluation (pycocotools) of any predictor over any DetectionSource.

A *predictor* maps a uint8 batch [B,3,S,S] of letterboxed images to
(boxes [B,K,4] in letterbox pixels, scores [B,K], classes [B,K]) as numpy or
torch; the PyTorch model and the exported ONNX model both plug in here, so they
are scored by exactly the same code.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from tqdm import tqdm

from centerx.data.base import DetectionSource
from centerx.data.pipeline import EvalDataset, build_loader
from centerx.data.transforms import invert_affine, transform_boxes
from centerx.engine import distributed as dist
from centerx.model.decode import decode, flip_merge

log = logging.getLogger(__name__)

Predictor = Callable[[torch.Tensor], tuple]
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def torch_predictor(model: nn.Module, k: int = 100, flip: bool = False) -> Predictor:
    """Wrap a CenterNet as a predictor; `flip` adds mirrored test-time augmentation."""

    @torch.no_grad()
    def predict(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = next(model.parameters()).device
        images = images.to(device)
        outputs = model(images)
        outputs = {**outputs, "heatmap": outputs["heatmap"].sigmoid()}
        if flip:
            mirrored = model(images.flip(3))
            outputs = flip_merge(outputs, {**mirrored, "heatmap": mirrored["heatmap"].sigmoid()})
        return decode(
            outputs["heatmap"], outputs["wh"], outputs["offset"], k=k, stride=model.stride
        )

    return predict


def to_original(boxes: np.ndarray, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """Letterbox pixels -> original image pixels (inverse of the eval affine), clipped."""
    original = transform_boxes(boxes, invert_affine(matrix))
    original[:, [0, 2]] = original[:, [0, 2]].clip(0, width)
    original[:, [1, 3]] = original[:, [1, 3]].clip(0, height)
    return original


def predict_source(
    predictor: Predictor,
    source: DetectionSource,
    image_size: int,
    batch_size: int = 16,
    num_workers: int = 0,
    score_threshold: float = 0.001,
    progress: bool = True,
) -> list[dict]:
    """COCO-format detections for every image of `source` (sharded across ranks, gathered)."""
    dataset = EvalDataset(source, image_size)
    if dist.is_distributed():
        # Every world_size-th image per rank. Not DistributedSampler: it pads the shards to
        # equal length by repeating images, whose detections would then be scored twice.
        shard = range(dist.rank(), len(dataset), dist.world_size())
        dataset = torch.utils.data.Subset(dataset, shard)
    loader = build_loader(dataset, batch_size, shuffle=False, num_workers=num_workers)
    results: list[dict] = []
    for batch in tqdm(loader, desc="eval", disable=not (progress and dist.is_main()), leave=False):
        if "image" not in batch:
            continue
        boxes, scores, classes = (
            np.asarray(t.cpu() if torch.is_tensor(t) else t) for t in predictor(batch["image"])
        )
        for i, index in enumerate(batch["source_index"].tolist()):
            info = source.image_info(index)
            keep = scores[i] >= score_threshold
            mapped = to_original(
                boxes[i][keep], batch["matrix"][i].numpy(), info.width, info.height
            )
            for box, score, cls in zip(
                mapped.tolist(), scores[i][keep].tolist(), classes[i][keep].tolist(), strict=True
            ):
                results.append(
                    {
                        "image_id": info.image_id,
                        "category_id": source.category_ids[int(cls)],
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                        "score": float(score),
                    }
                )
    return dist.gather_lists(results)


def _per_class(precision: np.ndarray, iou_index: slice | int) -> list[float | None]:
    """Mean precision per class over recall (and IoU) for area=all, maxDets=100; None without GT."""
    values = []
    for k in range(precision.shape[2]):
        p = precision[iou_index, :, k, 0, -1]
        p = p[p > -1]
        values.append(float(p.mean()) if p.size else None)
    return values


def coco_evaluate(ground_truth: dict, detections: list[dict], class_names: list[str]) -> dict:
    """AP, AP50, AP75, APs/m/l and per-class AP (and AP50) as {class name: value}."""
    empty = {key: 0.0 for key in SUMMARY_KEYS}
    if not detections:
        log.warning("no detections to evaluate: every metric is 0")
        zero = dict.fromkeys(class_names, 0.0)
        return {**empty, "per_class_AP": zero, "per_class_AP50": dict(zero), "num_detections": 0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [max(0.0, float(v)) for v in evaluator.stats[:6]]
    precision = evaluator.eval["precision"]
    # pycocotools orders categories by id; map back to our class order through the names.
    names_by_id = {c["id"]: c["name"] for c in ground_truth["categories"]}
    order = [names_by_id[cid] for cid in evaluator.params.catIds]
    return {
        **dict(zip(SUMMARY_KEYS, stats, strict=True)),
        "per_class_AP": dict(zip(order, _per_class(precision, slice(None)), strict=True)),
        "per_class_AP50": dict(zip(order, _per_class(precision, 0), strict=True)),
        "num_detections": len(detections),
    }


def format_table(metrics: dict, title: str = "COCO bbox") -> str:
    lines = [f"{title}: " + "  ".join(f"{k} {metrics[k]:.3f}" for k in SUMMARY_KEYS)]
    width = max((len(n) for n in metrics["per_class_AP"]), default=5)
    lines.append(f"  {'class':<{width}}  {'AP':>6}  {'AP50':>6}")
    for name, ap in metrics["per_class_AP"].items():
        ap50 = metrics["per_class_AP50"].get(name)
        fmt = lambda v: "   n/a" if v is None else f"{v:6.3f}"  # noqa: E731
        lines.append(f"  {name:<{width}}  {fmt(ap)}  {fmt(ap50)}")
    return "\n".join(lines)


def evaluate_predictor(
    predictor: Predictor,
    source: DetectionSource,
    image_size: int,
    batch_size: int = 16,
    num_workers: int = 0,
    ground_truth: dict | None = None,
    progress: bool = True,
) -> dict:
    """Predict and score on rank 0; every rank returns rank 0's metrics.

    Pass `ground_truth` (source.to_coco()) when evaluating repeatedly, to build it once."""
    detections = predict_source(
        predictor, source, image_size, batch_size, num_workers, progress=progress
    )
    if dist.is_main():
        metrics = coco_evaluate(ground_truth or source.to_coco(), detections, source.class_names)
    else:
        metrics = None
    return dist.broadcast(metrics)
