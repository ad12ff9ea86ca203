"""The measurement scripts run end to end at toy sizes and write what their docs promise.

They produce the README's figures, so a script that silently breaks would leave stale numbers.
Only the structure of the output is checked here: the figures themselves are measurements.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from centerx.model.centernet import build_model
from centerx.model.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / name), *args]


@pytest.mark.slow
def test_lr_stress_writes_three_runs_and_the_verdicts(tmp_path: Path, run_ok) -> None:
    out = tmp_path / "stress"
    run_ok(
        script(
            "lr_stress.py",
            *("--out", str(out), "--epochs", "1", "--images", "16", "--val-images", "4"),
            *("--batch-size", "8", "--eval-every", "1"),
            "data.image_size=64",
        ),
        timeout=600,
    )
    summary = json.loads((out / "lr_stress.json").read_text())
    assert summary["optimizer"] == "sgd" and summary["default_lr"] == pytest.approx(0.02)
    runs = summary["runs"]
    assert set(runs) == {"default_lr_fixed", "high_lr_fixed", "high_lr_adaptive"}
    assert runs["high_lr_fixed"]["lr"] == pytest.approx(10 * runs["default_lr_fixed"]["lr"])
    assert all(run["finished"] and run["exit_code"] == 0 for run in runs.values()), runs
    # The adaptive run really used the adaptive weighter (it logs its per-term scales).
    steps = [
        json.loads(line)
        for line in (out / "high_lr_adaptive" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any("scale/cls" in record for record in steps)
    assert not any("scale/cls" in line for line in (out / "high_lr_fixed" / "metrics.jsonl").open())
    assert set(summary["claims"]) >= {
        "fixed_high_lr_diverges_or_loses_most",
        "adaptive_high_lr_within_tolerance",
    }
    assert (out / "lr_stress.png").stat().st_size > 10_000
    report = (out / "lr_stress.md").read_text()
    assert all(f"| {name} |" in report for name in runs), report
    assert report.count("**PASS**") + report.count("**FAIL**") == 2, report


def run_for_json(run_ok, name: str, tmp_path: Path, *args: str) -> dict:
    report = tmp_path / "report.json"
    run_ok(script(name, *args, "--json", str(report)), timeout=600)
    return json.loads(report.read_text())


@pytest.mark.slow
def test_benchmark_train_reports_both_variants(tmp_path: Path, run_ok) -> None:
    result = run_for_json(
        run_ok,
        "benchmark_train.py",
        tmp_path,
        *("--steps", "1", "--warmup", "0", "--repeats", "1"),
        *("data.image_size=64", "train.batch_size=2", "train.num_threads=1"),
    )
    assert set(result["training"]) == {"centerx", "grad_checkpoint", "pytorch"}
    for variant in result["training"].values():
        assert variant["images_per_s_median"] > 0 and variant["skipped_steps"] == 0
    for variant in ("centerx", "grad_checkpoint"):
        for heap in ("returned", "default"):
            assert result["training"][variant]["memory"][heap]["peak_rss_mb"] > 0
    assert result["speed_ratio"]["centerx_vs_pytorch"] > 0
    assert result["pipeline"]["images_per_s_per_worker_median"] > 0
    assert result["config"]["image_size"] == 64 and result["config"]["batch_size"] == 2


def test_benchmark_train_speed_only_skips_checkpointing_and_memory(tmp_path: Path, run_ok) -> None:
    result = run_for_json(
        run_ok,
        "benchmark_train.py",
        tmp_path,
        *("--speed-only", "--steps", "1", "--warmup", "0", "--repeats", "1"),
        *("data.image_size=64", "train.batch_size=2", "train.num_threads=1"),
    )
    assert set(result["training"]) == {"centerx", "pytorch"}
    assert "memory" not in result["training"]["centerx"] and result["memory_ratio"] == {}
    assert set(result["speed_ratio"]) == {"centerx_vs_pytorch"}
    assert result["config"]["compile"] is False


def test_benchmark_train_profile_splits_both_steps(run_ok) -> None:
    done = run_ok(
        script(
            "benchmark_train.py",
            *("--profile", "--warmup", "1", "data.image_size=64", "train.batch_size=2"),
            "train.num_threads=1",
        ),
        timeout=300,
    )
    for name in ("centerx", "pytorch"):
        line = next(x for x in done.stdout.splitlines() if x.strip().startswith(f"{name}:"))
        share = float(line.split("ms of self CPU time per step, ")[1].split("%")[0])
        assert 0 < share < 100, line  # the tiny model's convolutions: most, not all, of it
    assert "aten::convolution_backward" in done.stdout


def test_benchmark_export_measures_every_variant(tmp_path: Path, run_ok) -> None:
    result = run_for_json(
        run_ok,
        "benchmark_export.py",
        tmp_path,
        *("--image-size", "64", "--repeats", "1", "--warmup", "0", "--threads", "1"),
    )
    assert {"post_detections", "post_heatmap", "e2e_onnx_detections", "e2e_torch_eager"} <= set(
        result["median_ms"]
    )
    assert all(ms > 0 for ms in result["median_ms"].values())
    assert result["image_size"] == 64 and result["heatmap_cells"] == 3 * 16 * 16


def test_kd_peak_weight_reports_faint_weight_and_object_probabilities(
    tmp_path: Path, run_ok, tiny_model_cfg
) -> None:
    folder = tmp_path / "voc" / "train"
    folder.mkdir(parents=True)
    for index in range(3):  # one raccoon per image, and a dog the teacher does not know
        cv2.imwrite(str(folder / f"{index}.png"), np.full((48, 64, 3), 40 * index, np.uint8))
        (folder / f"{index}.xml").write_text(
            f"<annotation><filename>{index}.png</filename>"
            "<object><name>raccoon</name><bndbox><xmin>4</xmin><ymin>4</ymin><xmax>30</xmax>"
            "<ymax>30</ymax></bndbox></object><object><name>dog</name><bndbox><xmin>34</xmin>"
            "<ymin>4</ymin><xmax>60</xmax><ymax>40</ymax></bndbox></object></annotation>"
        )
    torch.manual_seed(0)
    checkpoint = tmp_path / "teacher.pt"
    save_checkpoint(
        checkpoint,
        {
            "model": build_model(tiny_model_cfg, 1).state_dict(),
            "ema": None,
            "class_names": ["raccoon"],
            "model_config": OmegaConf.to_container(tiny_model_cfg),
            "image_size": 64,
        },
    )
    done = run_ok(
        script(
            "kd_peak_weight.py",
            *("--teacher", str(checkpoint), "--voc", str(tmp_path / "voc")),
            *("--images", "3", "--image-size", "64"),
        ),
        timeout=300,
    )
    assert "peak weight below 0.1:" in done.stdout, done.stdout
    assert "probability at 3 ground-truth centres" in done.stdout, done.stdout


def test_kd_gap_scores_the_four_combinations_by_class_name(
    tmp_path: Path, run_ok, tiny_model_cfg
) -> None:
    """A student that is the teacher scores the same four times; a student whose heatmap
    channels are another model's changes the heatmap rows only (channels picked by name)."""
    data = {
        "val": {
            "_target_": "centerx.data.synthetic.SyntheticShapes",
            "num_images": 6,
            "seed": 1,
            "class_names": ["square"],
            "image_size": 64,
        }
    }
    torch.manual_seed(0)
    teacher = build_model(tiny_model_cfg, 1)
    with torch.no_grad():  # a confident flat heatmap: detections everywhere, some hit boxes
        teacher.heads.wh[-1].bias.fill_(4.0)

    def save(path: Path, model: torch.nn.Module, classes: list[str]) -> str:
        state = {"model": model.state_dict(), "ema": None, "class_names": classes}
        state |= {"model_config": OmegaConf.to_container(tiny_model_cfg), "image_size": 64}
        save_checkpoint(path, {**state, "config": {"data": data}})
        return str(path)

    student = build_model(tiny_model_cfg, 2)  # classes [circle, square]: square is channel 1
    own = student.state_dict()
    for key, value in teacher.state_dict().items():
        own[key] = value if not key.startswith("heads.heatmap.2") else own[key]
    for key in ("heads.heatmap.2.weight", "heads.heatmap.2.bias"):
        own[key][1] = teacher.state_dict()[key][0]
    student.load_state_dict(own)
    done = run_ok(
        script(
            "kd_gap.py",
            *("--teacher", save(tmp_path / "t.pt", teacher, ["square"])),
            *("--student", save(tmp_path / "s.pt", student, ["circle", "square"])),
        ),
        timeout=300,
    )
    row = json.loads(done.stdout.strip().splitlines()[-1])
    scores = {row[name]["AP"] for name in ("student", "student heatmap + teacher boxes")}
    scores |= {row[name]["AP"] for name in ("teacher heatmap + student boxes", "teacher")}
    assert len(scores) == 1 and row["classes"] == ["square"], row
    assert scores.pop() > 0, row  # else equal by being empty
