"""Where a teacher's wh/offset KD weight goes: its detections, or its faint background peaks.

The wh/offset KD copies a teacher's box outputs at its 3x3 heatmap peaks, weighted by the peak
probability (centerx.losses.distill). A trained teacher's background is a field of faint local
maxima; this measures, on a VOC folder's images (letterboxed as in evaluation), how much of
that weight sits on peaks below --min-peak, and the teacher's probability at the ground-truth
centres of its classes (how many real objects a floor of --min-peak would drop).

    .venv/bin/python scripts/kd_peak_weight.py --teacher T.pt --voc ROOT [--split train] \\
        [--images 24] [--image-size 256] [--min-peak 0.1]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch

from centerx.data.pipeline import EvalDataset
from centerx.data.voc import VOCDetection
from centerx.errors import run_script
from centerx.losses.distill import teacher_peak_weight
from centerx.model.centernet import OUTPUT_STRIDE
from centerx.model.checkpoint import model_from_checkpoint


def centre_cells(boxes: np.ndarray, matrix: np.ndarray, grid: int) -> np.ndarray:
    """xyxy boxes in image pixels -> their centres' (x, y) cells on the output grid."""
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
    mapped = centres @ matrix[:, :2].T + matrix[:, 2]
    return np.clip((mapped / OUTPUT_STRIDE).astype(int), 0, grid - 1)


def measure(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    teacher, state = model_from_checkpoint(args.teacher)
    classes = [str(name) for name in state["class_names"]]
    source = VOCDetection(
        args.voc, split=args.split, class_names=classes, ignore_unknown_classes=True
    )
    dataset = EvalDataset(source, args.image_size)
    picked = np.linspace(0, len(dataset) - 1, min(args.images, len(dataset))).astype(int)
    total = faint = 0.0
    at_objects: list[float] = []
    for index in picked:
        sample = dataset[int(index)]
        with torch.no_grad():
            probs = teacher(torch.from_numpy(sample["image"])[None].float())["heatmap"].sigmoid()[0]
        peaks = teacher_peak_weight(probs[None], min_peak=0.0)[0, 0]  # every peak: no floor
        total += float(peaks.sum())
        faint += float(peaks[peaks < args.min_peak].sum())
        annotation = source.load_annotation(int(index))
        cells = centre_cells(annotation.boxes, sample["matrix"], probs.shape[-1])
        for (x, y), label in zip(cells, annotation.labels, strict=True):
            window = probs[int(label), max(0, y - 1) : y + 2, max(0, x - 1) : x + 2]
            at_objects.append(float(window.max()))
    objects = np.array(at_objects)
    print(f"teacher {args.teacher} ({classes}) on {len(picked)} {args.split} images of {args.voc}")
    print(f"  peak weight below {args.min_peak}: {faint / max(total, 1e-12):.0%} of {total:.1f}")
    if objects.size:
        quantiles = np.quantile(objects, [0.1, 0.25, 0.5, 0.75, 0.9]).round(3).tolist()
        print(
            f"  probability at {objects.size} ground-truth centres: quantiles 10/25/50/75/90% "
            f"{quantiles}; {np.mean(objects >= args.min_peak):.0%} reach {args.min_peak}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="a centerx checkpoint")
    parser.add_argument(
        "--voc", required=True, help="a VOC folder (its classes by the teacher's names)"
    )
    parser.add_argument("--split", default="train")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--min-peak", type=float, default=0.1)
    measure(parser.parse_args(argv))


if __name__ == "__main__":
    run_script(main)
