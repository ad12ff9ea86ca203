"""COCO evaluation of any predictor over any DetectionSource, and the files eval writes.

A *predictor* maps a uint8 batch [B,3,S,S] of letterboxed images to
(boxes [B,K,4] in letterbox pixels, scores [B,K], classes [B,K]) as numpy or
torch; the PyTorch model and the exported ONNX model both plug in here, so they
are scored by exactly the same code.

Scoring runs on faster-coco-eval (matching in C++, the same figures, far faster on large sets)
when it is installed, on pycocotools otherwise: both expose the same COCO/COCOeval API and
precision array, so one code path serves both (`coco_backend`). Partial-label data is scored
fairly: a class counts only on the images whose source labels it (`drop_unlabelled`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from centerx.data.base import DatasetError, DetectionSource
from centerx.data.pipeline import EvalDataset, build_loader
from centerx.engine import distributed as dist
from centerx.engine import interrupts
from centerx.errors import ConfigError
from centerx.model.decode import decode, flip_merge
from centerx_export.imaging import class_color, to_original

log = logging.getLogger(__name__)

Predictor = Callable[[torch.Tensor], tuple]
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
BACKENDS = ("auto", "faster", "pycocotools")
BACKEND_ENV = "CENTERX_COCO_BACKEND"
RESULT_KEYS = ("image_id", "category_id", "bbox", "score")
RESULT_FORMAT = "a JSON list of {image_id, category_id, bbox: [x, y, w, h], score}"


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
    for batch in tqdm(loader, desc="eval", disable=not dist.progress_bars(progress), leave=False):
        interrupts.raise_if_requested()  # inside training: Ctrl-C does not wait for the pass
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


@dataclass(frozen=True)
class CocoBackend:
    """A COCO scorer: its ground-truth class, its evaluator, and what keeps the evaluator quiet."""

    name: str
    coco: type
    cocoeval: type
    quiet: dict  # evaluator keyword arguments that silence its progress lines


def coco_backend(name: str | None = None) -> CocoBackend:
    """`name`, else $CENTERX_COCO_BACKEND, else "auto": faster-coco-eval when importable, else
    pycocotools. "faster" or "pycocotools" forces one (to compare them, or to rule one out)."""
    name = name or os.environ.get(BACKEND_ENV) or "auto"
    if name not in BACKENDS:
        raise ConfigError(f"unknown COCO backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name != "pycocotools":
        try:
            from faster_coco_eval import COCO as FasterCOCO
            from faster_coco_eval import COCOeval_faster
        except ImportError:
            if name == "faster":
                raise ConfigError(
                    "COCO backend 'faster' needs faster-coco-eval: pip install faster-coco-eval"
                ) from None
        else:
            return CocoBackend("faster", FasterCOCO, COCOeval_faster, {"print_function": log.debug})
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return CocoBackend("pycocotools", COCO, COCOeval, {})


@dataclass
class Scores:
    """COCO metrics and the precision-recall curves they summarise (eval draws the curves)."""

    metrics: dict
    # Interpolated precision [IoU 0.5:0.05:0.95, recall 0:0.01:1, class] at area=all,
    # maxDets=100, classes in class_names order; -1 for a class without ground truth.
    precision: np.ndarray


def _class_means(precision: np.ndarray) -> list[float | None]:
    """Mean precision per class over IoU and recall thresholds [T, R, K]; None without GT."""
    valid = precision > -1
    counts = valid.sum((0, 1))
    sums = np.where(valid, precision, 0.0).sum((0, 1))
    return [float(s / n) if n else None for s, n in zip(sums, counts, strict=True)]


def _run_cocoeval(ground_truth: dict, detections: list[dict], backend: CocoBackend):
    """A COCOeval (bbox) evaluated, accumulated and summarised."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = backend.coco()
        gt.dataset = ground_truth
        gt.createIndex()
        # Copies: both backends' loadRes write id/area/segmentation into the records.
        dt = gt.loadRes([dict(d) for d in detections])
        evaluator = backend.cocoeval(gt, dt, "bbox", **backend.quiet)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def coco_scores(
    ground_truth: dict,
    detections: list[dict],
    class_names: list[str],
    backend: str | None = None,
) -> Scores:
    """AP, AP50, AP75, APs/m/l, per-class AP and AP50 ({class name: value}, None for a class
    without ground truth) and the curves behind them. Every image counts for every class (see
    score_detections for partial labels); ground_truth lists its categories in class_names order,
    as source.to_coco() does."""
    if not detections:
        log.warning("no detections to evaluate: every metric is 0")
        boxed = {a["category_id"] for a in ground_truth["annotations"]}
        # A class without ground truth has no AP (n/a), as when there are detections.
        categories = zip(class_names, ground_truth["categories"], strict=True)
        zero = {name: 0.0 if c["id"] in boxed else None for name, c in categories}
        per_class = {"per_class_AP": zero, "per_class_AP50": dict(zero), "num_detections": 0}
        metrics = dict.fromkeys(SUMMARY_KEYS, 0.0) | per_class
        return Scores(metrics, np.zeros((10, 101, len(class_names))))
    evaluator = _run_cocoeval(ground_truth, detections, coco_backend(backend))
    # COCOeval orders categories by id; put them back in class order.
    column = {int(cid): k for k, cid in enumerate(evaluator.params.catIds)}
    order = [column[c["id"]] for c in ground_truth["categories"]]
    precision = evaluator.eval["precision"][:, :, order, 0, -1]
    metrics = {
        **dict(zip(SUMMARY_KEYS, (max(0.0, float(v)) for v in evaluator.stats[:6]), strict=True)),
        "per_class_AP": dict(zip(class_names, _class_means(precision), strict=True)),
        "per_class_AP50": dict(zip(class_names, _class_means(precision[:1]), strict=True)),
        "num_detections": len(detections),
    }
    return Scores(metrics, precision)


def coco_evaluate(
    ground_truth: dict, detections: list[dict], class_names: list[str], backend: str | None = None
) -> dict:
    """The metrics of coco_scores (every image scored for every class)."""
    return coco_scores(ground_truth, detections, class_names, backend).metrics


def drop_unlabelled(source: DetectionSource, detections: list[dict]) -> list[dict]:
    """The detections of classes that their image's source labels.

    An image whose source does not label class c holds no ground truth of c, so COCOeval would
    count even a correct detection of c there as a false positive. Dropping those detections
    scores c exactly on the images that label it: an image with neither ground truth nor
    detections of c takes no part in c's precision-recall curve."""
    labelled = {
        source.image_info(i).image_id: np.asarray(source.labeled_classes(i), bool)
        for i in range(len(source))
    }
    if all(mask.all() for mask in labelled.values()):
        return detections
    class_of = {cid: k for k, cid in enumerate(source.category_ids)}
    return [d for d in detections if labelled[d["image_id"]][class_of[d["category_id"]]]]


def score_detections(
    source: DetectionSource,
    detections: list[dict],
    ground_truth: dict | None = None,
    backend: str | None = None,
) -> Scores:
    """Score `source`'s detections (COCO results format, its ids), each class only on the images
    that label it. Pass `ground_truth` (source.to_coco()) when scoring repeatedly, to build it
    once."""
    kept = drop_unlabelled(source, detections)
    return coco_scores(ground_truth or source.to_coco(), kept, source.class_names, backend)


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
    backend: str | None = None,
) -> dict:
    """Predict and score on rank 0; every rank returns rank 0's metrics.

    Pass `ground_truth` (source.to_coco()) when evaluating repeatedly, to build it once."""
    detections = predict_source(
        predictor, source, image_size, batch_size, num_workers, progress=progress
    )
    metrics = None
    if dist.is_main():
        metrics = score_detections(source, detections, ground_truth, backend).metrics
    return dist.broadcast(metrics)


def _is_result(record: object) -> bool:
    """A dict with the four keys, a bbox of 4 numbers and a number score."""
    if not (isinstance(record, dict) and all(k in record for k in RESULT_KEYS)):
        return False
    numbers = [*record["bbox"], record["score"]] if isinstance(record["bbox"], list) else []
    return len(numbers) == 5 and all(isinstance(v, int | float) for v in numbers)


def check_results(records: object, source: DetectionSource, origin: str) -> list[dict]:
    """`records` if they are COCO results on `source`'s images and categories; else one clear
    line (not a KeyError deep inside COCOeval)."""
    if not isinstance(records, list):
        raise DatasetError(f"{origin} holds a {type(records).__name__}; expected {RESULT_FORMAT}")
    bad = next((i for i, r in enumerate(records) if not _is_result(r)), None)
    if bad is not None:
        raise DatasetError(
            f"{origin}: record {bad} is {str(records[bad])[:80]}; expected {RESULT_FORMAT}"
        )
    image_ids = {source.image_info(i).image_id for i in range(len(source))}
    unknown = sorted({r["image_id"] for r in records} - image_ids, key=str)
    if unknown:
        raise DatasetError(
            f"{origin} names image ids {unknown[:5]} not among the {len(image_ids)} images scored; "
            "pick the data and split it was made on (data=..., split=...)"
        )
    unknown = sorted({r["category_id"] for r in records} - set(source.category_ids), key=str)
    if unknown:
        raise DatasetError(
            f"{origin} names category ids {unknown[:5]}; the data's are {source.category_ids}"
        )
    return records


def load_results(path: str | Path, source: DetectionSource) -> list[dict]:
    """A COCO results file made elsewhere (`eval results=PATH`), checked against `source`."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"results file not found: {path}")
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(
            f"results file {path} is not JSON ({err}); expected {RESULT_FORMAT}"
        ) from None
    return check_results(records, source, f"results file {path}")


def plot_pr_curves(scores: Scores, path: Path, title: str = "") -> None:
    """Per-class precision-recall curves at IoU 0.5 and averaged over IoU 0.5:0.95, each class's
    AP in the legend: the shape shows where AP is lost (low recall, or early false positives)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, precision = scores.metrics, scores.precision
    recall = np.linspace(0.0, 1.0, precision.shape[1])
    panels = (
        (f"IoU 0.5 (AP50 {metrics['AP50']:.3f})", precision[0], metrics["per_class_AP50"]),
        (f"IoU 0.5:0.95 (AP {metrics['AP']:.3f})", precision.mean(0), metrics["per_class_AP"]),
    )
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), sharey=True)
    for ax, (label, curves, class_ap) in zip(axes, panels, strict=True):
        for k, (name, ap) in enumerate(class_ap.items()):
            if ap is not None:  # a class without ground truth has no curve
                color = np.array(class_color(k)) / 255
                ax.plot(recall, curves[:, k], color=color, label=f"{name} {ap:.3f}")
        ax.set(xlabel="recall", title=label, xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(fontsize="x-small", ncol=1 + len(class_ap) // 20, loc="lower left")
    axes[0].set_ylabel("precision")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_evaluation(
    source: DetectionSource,
    detections: list[dict],
    out_dir: Path,
    title: str,
    backend: str | None = None,
) -> dict:
    """Score on rank 0, print the table and write eval.json, detections.json (COCO results format
    with the dataset's own ids, original pixels: `eval results=` re-scores it, COCO tools read it)
    and pr_curves.png into out_dir. Every rank returns the metrics."""
    metrics = None
    if dist.is_main():
        scores = score_detections(source, detections, backend=backend)
        metrics = scores.metrics
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").write_text(json.dumps(metrics, indent=1))
        (out_dir / "detections.json").write_text(json.dumps(detections))
        plot_pr_curves(scores, out_dir / "pr_curves.png", title)
        print(format_table(metrics, title=title))
    return dist.broadcast(metrics)
