"""Side-by-side latency of the exported model (a benchmark, not a test).

For one model and input size, batch 1, on CPU, with repeats interleaved so that machine load
hits every variant alike (medians reported):

- host-side post-processing: `detections` mode (the host only thresholds the in-graph top-K)
  vs `heatmap` mode (the host runs numpy top-K + gathers on the peak-masked map);
- end to end (letterboxed uint8 batch in, boxes/scores/classes out): onnxruntime, both modes,
  vs PyTorch eager (the same model, decode in torch as the evaluator does).

    .venv/bin/python scripts/benchmark_export.py --backbone resnet18 --image-size 512
    .venv/bin/python scripts/benchmark_export.py --checkpoint runs/x/checkpoints/best.pt --json b.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from omegaconf import OmegaConf

from centerx.engine.evaluate import torch_predictor
from centerx.errors import run_script
from centerx.exporter.onnx import export_onnx
from centerx.model.centernet import build_model
from centerx.model.checkpoint import model_from_checkpoint
from centerx_export.predictor import OnnxDetector

REPO = Path(__file__).resolve().parents[1]


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, list[str], int]:
    if args.checkpoint:
        model, state = model_from_checkpoint(args.checkpoint)
        return model, list(state["class_names"]), int(args.image_size or state["image_size"])
    cfg = OmegaConf.load(REPO / "conf" / "model" / "centernet.yaml")
    cfg.backbone = args.backbone
    cfg.pretrained = None if args.backbone == "tiny" else False
    torch.manual_seed(0)
    names = [f"class{i}" for i in range(args.classes)]
    return build_model(cfg, len(names), pretrained=cfg.pretrained).eval(), names, args.image_size


def timed(function, inner: int = 1) -> float:
    """Milliseconds per call (mean over `inner` back-to-back calls)."""
    start = time.perf_counter()
    for _ in range(inner):
        function()
    return (time.perf_counter() - start) * 1000 / inner


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", default=None, help="a centerx checkpoint (else a fresh model)"
    )
    parser.add_argument("--backbone", default="tiny", help="fresh model: tiny | resnet18 | ...")
    parser.add_argument("--classes", type=int, default=3, help="fresh model: number of classes")
    parser.add_argument(
        "--image-size", type=int, default=None, help="default 512 (fresh) or the checkpoint's"
    )
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch and onnxruntime threads"
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.image_size is None and not args.checkpoint:
        args.image_size = 512

    torch.set_num_threads(args.threads)
    model, class_names, size = load_model(args)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1, 3, size, size), dtype=np.uint8)
    tensor = torch.from_numpy(images)

    with tempfile.TemporaryDirectory() as tmp:
        detectors = {}
        for mode in ("detections", "heatmap"):
            path = Path(tmp) / f"{mode}.onnx"
            export_onnx(
                model,
                path,
                image_size=size,
                mode=mode,
                top_k=args.top_k,
                metadata={"class_names": class_names},
            )
            detectors[mode] = OnnxDetector(
                path, top_k=args.top_k, providers=["CPUExecutionProvider"], threads=args.threads
            )
    predict_torch = torch_predictor(model, k=args.top_k)
    raw = {mode: d.run(images) for mode, d in detectors.items()}
    threshold = args.score_threshold

    def post(mode: str):
        def run() -> None:
            boxes, scores, classes = detectors[mode].decode(raw[mode])
            keep = scores[0] >= threshold
            _ = boxes[0][keep], scores[0][keep], classes[0][keep]

        return run

    variants = {
        "post_detections": (post("detections"), 50),
        "post_heatmap": (post("heatmap"), 10),
        "e2e_onnx_detections": (lambda: detectors["detections"].predict_letterboxed(images), 1),
        "e2e_onnx_heatmap": (lambda: detectors["heatmap"].predict_letterboxed(images), 1),
        "e2e_torch_eager": (lambda: predict_torch(tensor), 1),
        "graph_onnx_detections": (lambda: detectors["detections"].run(images), 1),
        "graph_onnx_heatmap": (lambda: detectors["heatmap"].run(images), 1),
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for repeat in range(args.warmup + args.repeats):
            for name, (function, inner) in variants.items():  # interleaved
                value = timed(function, inner)
                if repeat >= args.warmup:
                    samples[name].append(value)
    median = {name: statistics.median(values) for name, values in samples.items()}
    ratios = {
        "post_heatmap / post_detections": median["post_heatmap"] / median["post_detections"],
        "e2e_onnx_detections / e2e_torch_eager": median["e2e_onnx_detections"]
        / median["e2e_torch_eager"],
        "e2e_onnx_heatmap / e2e_torch_eager": median["e2e_onnx_heatmap"]
        / median["e2e_torch_eager"],
        "e2e_onnx_heatmap / e2e_onnx_detections": median["e2e_onnx_heatmap"]
        / median["e2e_onnx_detections"],
    }
    heat = raw["heatmap"]["heatmap"]
    result = {
        "model": args.checkpoint
        or f"fresh {args.backbone}, {args.classes} classes (random weights)",
        "image_size": size,
        "batch": 1,
        "top_k": args.top_k,
        "heatmap_cells": int(heat.size),
        "heatmap_peaks": int((heat > 0).sum()),
        "threads": args.threads,
        "repeats": args.repeats,
        "median_ms": median,
        "ratios": ratios,
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    print(
        f"\n{result['model']} at {size}x{size}, batch 1, {args.threads} threads, "
        f"{args.repeats} interleaved repeats (medians); heatmap {heat.shape[1:]} with "
        f"{result['heatmap_peaks']} peaks"
    )
    print(f"{'variant':<26} {'median ms':>10}")
    for name, value in median.items():
        print(f"{name:<26} {value:>10.3f}")
    print(f"\n{'ratio':<42} {'value':>8}")
    for name, value in ratios.items():
        print(f"{name:<42} {value:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    run_script(main)
