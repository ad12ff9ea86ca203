"""Average one-class teachers into one init checkpoint for `model.init_from` (an experiment of
this folder's README, not a centerx feature): every weight is the teachers' mean, except the
heatmap output layer, whose channels are stacked in the teachers' order. The teachers must
share an architecture (and, for the mean to make sense, their initialisation: same seed).

    python soup.py OUT.pt TEACHER_A.pt TEACHER_B.pt
"""

import sys

import torch

from centerx.model.checkpoint import (
    HEATMAP_OUT,
    inference_weights,
    load_checkpoint,
    save_checkpoint,
)


def main(out: str, paths: list[str]) -> None:
    states = [load_checkpoint(path) for path in paths]
    weights = [inference_weights(state) for state in states]
    averaged = {}
    for key, value in weights[0].items():
        if key in HEATMAP_OUT:
            averaged[key] = torch.cat([w[key] for w in weights])
        elif value.is_floating_point():
            averaged[key] = sum(w[key] for w in weights) / len(weights)
        else:  # BatchNorm's batch counters
            averaged[key] = value
    save_checkpoint(
        out,
        {
            "model": averaged,
            "model_config": states[0]["model_config"],
            "class_names": [name for state in states for name in state["class_names"]],
            "image_size": states[0]["image_size"],
        },
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
