"""Where a distilled student loses AP against its teacher: its heatmap, or its boxes.

Scores four models on the teacher's own held-out data (its checkpoint's data config, `--split`):
the student, the student's heatmap with the teacher's wh/offset, the teacher's heatmap with the
student's wh/offset, and the teacher. The student's heatmap channels are taken by the
teacher's class names, so a multi-class student is compared on one teacher's classes.

    .venv/bin/python scripts/kd_gap.py --teacher T.pt --student S.pt [S2.pt ...] [--split test]

Reading: if "student heatmap + teacher boxes" is close to the teacher, the student's boxes
(wh/offset KD) are what it lacks; if "teacher heatmap + student boxes" is, its heatmap is.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import torch
from omegaconf import OmegaConf
from torch import nn

from centerx.engine.build import build_eval_source
from centerx.engine.evaluate import evaluate_predictor, torch_predictor
from centerx.errors import UsageError, run_script
from centerx.model.checkpoint import model_from_checkpoint


class Combined(nn.Module):
    """Heatmap channels `channels` of one model, wh and offset of another."""

    def __init__(self, heatmap: nn.Module, channels: list[int], boxes: nn.Module) -> None:
        super().__init__()
        self.heatmap_model, self.boxes_model = heatmap, boxes
        self.register_buffer("channels", torch.tensor(channels, dtype=torch.long))
        self.stride = boxes.stride

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        boxes = self.boxes_model(images)
        same = self.heatmap_model is self.boxes_model  # one forward, not two
        heatmap = (boxes if same else self.heatmap_model(images))["heatmap"]
        heatmap = heatmap.index_select(1, self.channels)
        return {"heatmap": heatmap, "wh": boxes["wh"], "offset": boxes["offset"]}


def channels_of(student_classes: Sequence[str], teacher_classes: Sequence[str]) -> list[int]:
    missing = [name for name in teacher_classes if name not in student_classes]
    if missing:
        raise UsageError(
            f"the student has no class(es) {missing} of the teacher's {list(teacher_classes)}"
        )
    return [list(student_classes).index(name) for name in teacher_classes]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True, nargs="+")
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher, state = model_from_checkpoint(args.teacher)
    classes = [str(name) for name in state["class_names"]]
    data = (state.get("config") or {}).get("data")
    if not data:
        raise UsageError(f"{args.teacher} carries no data config to score it on")
    source = build_eval_source(OmegaConf.create(data), args.split, classes)
    size = int(state["image_size"])
    own = list(range(len(classes)))

    def scores(model: nn.Module) -> dict[str, float]:
        metrics = evaluate_predictor(torch_predictor(model.eval()), source, size, progress=False)
        return {"AP50": round(metrics["AP50"], 4), "AP": round(metrics["AP"], 4)}

    teacher_scores = scores(teacher)  # the same for every student
    for path in args.student:
        student, student_state = model_from_checkpoint(path)
        picked = channels_of(student_state["class_names"], classes)
        row = {
            "student": scores(Combined(student, picked, student)),
            "student heatmap + teacher boxes": scores(Combined(student, picked, teacher)),
            "teacher heatmap + student boxes": scores(Combined(teacher, own, student)),
            "teacher": teacher_scores,
        }
        print(json.dumps({"checkpoint": path, "classes": classes, **row}), flush=True)


if __name__ == "__main__":
    run_script(main)
