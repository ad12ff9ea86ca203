"""COCO scoring speed: faster-coco-eval against pycocotools on synthetic ground truth/detections.

    .venv/bin/python scripts/benchmark_eval.py                                  # 500 images
    .venv/bin/python scripts/benchmark_eval.py --images 5000 --json speed.json  # COCO val size

Both backends score the same data through centerx.engine.evaluate.coco_scores, the one path every
evaluation takes (index building, matching, accumulation, summary), alternating which goes first
each repeat. Reported: the median seconds per backend and their ratio. The figures (AP, AP50, ...,
per-class AP and AP50, the precision curves) must agree, else it exits non-zero.

Data, per image: `--objects` ground-truth boxes (log-uniform sides, so small, medium and large
all occur) of random classes, a crowd region on every tenth image; detections: each object found
with probability 0.8 (box jittered by ~5% of its size), the rest of `--dets` random false
positives, scored lower on average than the true ones. Category ids are non-contiguous, as COCO's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from centerx.engine.evaluate import Scores, coco_backend, coco_scores
from centerx.errors import run_script

BACKENDS = ("pycocotools", "faster")


def random_boxes(rng: np.random.Generator, count: int, width: int, height: int) -> np.ndarray:
    """`count` xywh boxes inside a width x height image, sides log-uniform in 8..half the image."""
    sides = np.exp(rng.uniform(np.log(8), np.log(min(width, height) / 2), (count, 2)))
    corners = rng.uniform(0, 1, (count, 2)) * (np.array([width, height]) - sides)
    return np.concatenate([corners, sides], 1)


def image_records(
    rng: np.random.Generator, image_id: int, args: argparse.Namespace, category_ids: list[int]
) -> tuple[dict, list[dict], list[dict]]:
    """One image: its COCO image record, annotations (ids filled in later) and detections."""
    width, height = (int(v) for v in rng.integers(320, 641, 2))
    boxes = random_boxes(rng, args.objects, width, height)
    labels = rng.integers(len(category_ids), size=args.objects)
    crowd = np.zeros(args.objects, bool)
    crowd[-1] = image_id % 10 == 0
    annotations = [
        {"image_id": image_id, "category_id": category_ids[label], "bbox": box, "iscrowd": int(c)}
        for box, label, c in zip(boxes.tolist(), labels.tolist(), crowd.tolist(), strict=True)
    ]
    found = (rng.random(args.objects) < 0.8) & ~crowd
    jitter = rng.normal(0, 0.05, (int(found.sum()), 4)) * boxes[found][:, [2, 3, 2, 3]]
    num_false = max(0, args.dets - int(found.sum()))
    det_boxes = np.concatenate([boxes[found] + jitter, random_boxes(rng, num_false, width, height)])
    det_boxes[:, 2:] = det_boxes[:, 2:].clip(1, None)
    det_labels = np.concatenate([labels[found], rng.integers(len(category_ids), size=num_false)])
    scores = np.concatenate([rng.uniform(0.3, 1, int(found.sum())), rng.uniform(0, 0.7, num_false)])
    detections = [
        {"image_id": image_id, "category_id": category_ids[label], "bbox": box, "score": score}
        for box, label, score in zip(
            det_boxes.tolist(), det_labels.tolist(), scores.tolist(), strict=True
        )
    ]
    image = {"id": image_id, "width": width, "height": height}
    return image, annotations, detections


def synthetic_set(args: argparse.Namespace) -> tuple[dict, list[dict], list[str]]:
    """(COCO ground truth, COCO results, class names) of `args.images` random images."""
    rng = np.random.default_rng(args.seed)
    names = [f"class{k}" for k in range(args.classes)]
    category_ids = [2 * k + 1 for k in range(args.classes)]
    images, annotations, detections = [], [], []
    for image_id in range(1, args.images + 1):
        image, image_annotations, image_detections = image_records(
            rng, image_id, args, category_ids
        )
        images.append(image)
        for ann in image_annotations:
            w, h = ann["bbox"][2:]
            annotations.append({**ann, "id": len(annotations) + 1, "area": w * h})
        detections += image_detections
    categories = [{"id": cid, "name": n} for cid, n in zip(category_ids, names, strict=True)]
    return (
        {"images": images, "annotations": annotations, "categories": categories},
        detections,
        names,
    )


def figures(metrics: dict) -> list[float]:
    """Every number of a metrics dict, flat (-1 for a class without ground truth)."""
    per_class = [m for key in ("per_class_AP", "per_class_AP50") for m in metrics[key].values()]
    summary = [metrics[key] for key in metrics if not key.startswith("per_class")]
    return summary + [-1.0 if value is None else value for value in per_class]


def same_scores(a: Scores, b: Scores) -> bool:
    """Equal figures and curves, up to float summation order."""
    return np.allclose(figures(a.metrics), figures(b.metrics), rtol=0, atol=1e-9) and np.allclose(
        a.precision, b.precision, rtol=0, atol=1e-9
    )


def measure(args: argparse.Namespace) -> dict:
    ground_truth, detections, names = synthetic_set(args)
    seconds: dict[str, list[float]] = {name: [] for name in BACKENDS}
    first: dict[str, Scores] = {}
    for repeat in range(args.repeats):
        for backend in BACKENDS if repeat % 2 == 0 else BACKENDS[::-1]:
            started = time.perf_counter()
            scores = coco_scores(ground_truth, detections, names, backend=backend)
            seconds[backend].append(time.perf_counter() - started)
            first.setdefault(backend, scores)
    if not same_scores(first["pycocotools"], first["faster"]):
        sys.exit(
            "the two backends disagree on these detections:\n"
            f"pycocotools {first['pycocotools'].metrics}\nfaster {first['faster'].metrics}"
        )
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    return {
        "images": args.images,
        "detections": len(detections),
        "annotations": len(ground_truth["annotations"]),
        "classes": args.classes,
        "AP": first["faster"].metrics["AP"],
        "seconds": seconds,
        "median_s": medians,
        "speedup": medians["pycocotools"] / medians["faster"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--objects", type=int, default=7, help="ground-truth boxes per image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    try:
        coco_backend("faster")
    except ValueError as err:
        sys.exit(str(err))
    result = measure(args)
    print(
        f"{result['images']} images, {result['annotations']} objects, "
        f"{result['detections']} detections, {result['classes']} classes (AP {result['AP']:.4f}, "
        f"identical on both backends); median of {args.repeats} runs:"
    )
    for name in BACKENDS:
        print(f"  {name:<12} {result['median_s'][name]:8.3f} s")
    print(f"  faster-coco-eval is {result['speedup']:.1f}x faster")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    run_script(main)
