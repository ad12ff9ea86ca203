"""The heatmap-KD stall on a toy: how fast a sparse class channel rises to its teacher's peak.

A stand-in for a KD-only student on real photos (80x80 output map, one object of class A per
image, a teacher peak of 0.7). Per cell, fixed random features (16, noise) carry each object
as a class direction times a Gaussian bump; a shared hidden layer (1x1 conv, ReLU) feeds two
class channels (1x1 conv, biases at the CenterNet prior 0.1):

    class A: one object, teacher peak 0.7       (the channel that stalls)
    class B: four objects, teacher peaks 0.6    (another teacher's class, sharing the features)

Each heatmap loss (a dotted path to a `(student_logits, teacher_probs) -> scalar` function,
as the objective's `heatmap_loss._target_`) trains the student with AdamW (lr 2e-3, the
real-photo recipe's) on teacher A's loss plus teacher B's; the script prints, per loss and
seed, the student's class-A probability at the teacher's peak every --every steps and the
first step it reaches --reach. `--alone` drops class B (the control: no shared competitor);
`--with-kl` adds a candidate measured for the design, KL between Bernoullis (BCE minus the
teacher's entropy, normalised like the focal loss).

    .venv/bin/python scripts/kd_stall.py [--steps 300] [--seeds 0 1 2 3 4] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import get_method
from torch import nn

from centerx.errors import run_script
from centerx.losses.distill import teacher_peak_mass
from centerx.model.heads import HEATMAP_BIAS

HeatmapLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DEFAULT_LOSSES = (
    "centerx.losses.distill.heatmap_kd_focal",
    "centerx.losses.distill.heatmap_kd_mse",
)
MAP_SIZE = 80
FEATURES = 16
HIDDEN = 16
SIGMA = 2.0  # teacher Gaussian and object bump, in cells
SIGNAL = 3.0  # object bump amplitude against unit feature noise
BACKGROUND = 1e-3  # a trained teacher's background is small, not exactly 0
CLASS_A = ((20, 55), 0.7)
CLASS_B = (((60, 15), (60, 60), (15, 15), (40, 35)), 0.6)
LR = 2e-3


def gaussian(centre: tuple[int, int], peak: float) -> torch.Tensor:
    """[H,W] bump of height `peak` and std SIGMA at `centre` (row, column)."""
    rows = torch.arange(MAP_SIZE, dtype=torch.float32).view(-1, 1)
    cols = torch.arange(MAP_SIZE, dtype=torch.float32).view(1, -1)
    squared = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2
    return peak * torch.exp(-squared / (2 * SIGMA**2))


def toy(seed: int, with_b: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [1,F,H,W], teacher probabilities [1,K,H,W]); K = 2 (A, B), or 1 without B."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(1, FEATURES, MAP_SIZE, MAP_SIZE, generator=generator)
    a_direction, b_direction = torch.randn(2, FEATURES, 1, 1, generator=generator)
    a_centre, a_peak = CLASS_A
    features += SIGNAL * a_direction * gaussian(a_centre, 1.0)
    teachers = [gaussian(a_centre, a_peak)]
    if with_b:
        b_centres, b_peak = CLASS_B
        features += SIGNAL * b_direction * sum(gaussian(c, 1.0) for c in b_centres)
        teachers.append(torch.stack([gaussian(c, b_peak) for c in b_centres]).amax(dim=0))
    return features, torch.stack(teachers).unsqueeze(0).clamp(min=BACKGROUND)


def rise_curve(loss: HeatmapLoss, steps: int, seed: int, with_b: bool = True) -> dict:
    """Train the toy student; per step its class-A probability at the teacher's peak (and,
    with B, the mean of its class-B probabilities at B's peaks)."""
    torch.manual_seed(seed)
    features, teacher = toy(seed, with_b)
    channels = teacher.shape[1]
    student = nn.Sequential(
        nn.Conv2d(FEATURES, HIDDEN, 1), nn.ReLU(), nn.Conv2d(HIDDEN, channels, 1)
    )
    nn.init.constant_(student[-1].bias, HEATMAP_BIAS)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=1e-4)
    a_row, a_col = CLASS_A[0]
    b_index = tuple(torch.tensor(c) for c in zip(*CLASS_B[0], strict=True))
    curve: dict[str, list[float]] = {"a_at_peak": [], "b_at_peaks": []}
    for _ in range(steps):
        logits = student(features)
        # one teacher per class, their terms summed (the objective's teacher_balance=sum)
        total = sum(loss(logits[:, k : k + 1], teacher[:, k : k + 1]) for k in range(channels))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        probs = torch.sigmoid(logits.detach()[0])
        curve["a_at_peak"].append(float(probs[0, a_row, a_col]))
        if with_b:
            curve["b_at_peaks"].append(float(probs[1][b_index].mean()))
    return curve


def bernoulli_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Design candidate (not in the library): sum KL(q || p) / peak mass; its gradient is p - q."""
    q = teacher_probs
    entropy = -(torch.xlogy(q, q) + torch.xlogy(1 - q, 1 - q))
    cross_entropy = F.binary_cross_entropy_with_logits(student_logits, q, reduction="none")
    return (cross_entropy - entropy).sum() / teacher_peak_mass(q)


def first_reach(values: list[float], level: float) -> int | None:
    """1-based optimiser step after which the value first is >= level (None: never)."""
    return next((step for step, value in enumerate(values, 1) if value >= level), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--every", type=int, default=25, help="print the curve every N steps")
    parser.add_argument("--reach", type=float, default=0.5, help="the rise counts from here")
    parser.add_argument("--losses", nargs="+", default=list(DEFAULT_LOSSES))
    parser.add_argument("--with-kl", action="store_true", help="also the KL candidate")
    parser.add_argument("--alone", action="store_true", help="class A only (no shared class B)")
    parser.add_argument("--json", type=Path, help="write the curves here")
    args = parser.parse_args()
    losses: dict[str, HeatmapLoss] = {
        path.rsplit(".", 1)[-1]: get_method(path) for path in args.losses
    }
    if args.with_kl:
        losses["bernoulli_kl"] = bernoulli_kl
    torch.set_num_threads(1)
    # The focal loss's gradient on well-classified background goes as p^3: subnormal floats,
    # which make CPU kernels ~4x slower (flushing them to 0 changes no printed figure).
    torch.set_flush_denormal(True)
    shown = list(range(0, args.steps + 1, args.every))[1:]
    print(f"class-A probability at the teacher's peak ({CLASS_A[1]}), after N steps (prior 0.1)")
    print(f"{'loss':<18}{'seed':>5}" + "".join(f"{n:>7}" for n in shown) + f"   >= {args.reach} at")
    results: dict[str, dict[int, dict]] = {}
    for name, loss in losses.items():
        results[name] = {}
        for seed in args.seeds:
            curve = rise_curve(loss, args.steps, seed, with_b=not args.alone)
            curve["first_reach"] = first_reach(curve["a_at_peak"], args.reach)
            results[name][seed] = curve
            row = "".join(f"{curve['a_at_peak'][n - 1]:>7.3f}" for n in shown)
            print(f"{name:<18}{seed:>5}{row}   {curve['first_reach'] or 'never'}")
    if args.json:
        summary = {"steps": args.steps, "reach": args.reach, "alone": args.alone}
        args.json.write_text(json.dumps({**summary, "curves": results}))


if __name__ == "__main__":
    run_script(main)
