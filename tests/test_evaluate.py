"""COCO scoring: both backends agree, partial labels are scored fairly, eval's files round-trip."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from centerx.data.base import Annotation, DetectionSource, ImageInfo
from centerx.data.synthetic import SyntheticShapes
from centerx.engine.evaluate import (
    SUMMARY_KEYS,
    check_results,
    coco_backend,
    coco_scores,
    evaluate_predictor,
    load_results,
    predict_source,
    score_detections,
    write_evaluation,
)
from centerx_export.imaging import letterbox_matrix, transform_boxes

IMAGE_SIZE = 64  # letterbox side the predictors below work at


class ListSource(DetectionSource):
    """Blank images of given sizes with given annotations, ids and labelled classes: scoring
    needs the boxes, not the pixels."""

    def __init__(
        self,
        sizes: list[tuple[int, int]],
        annotations: list[Annotation],
        class_names: list[str],
        category_ids: list[int],
        labelled: list[list[bool]] | None = None,
    ) -> None:
        self.sizes, self.annotations = sizes, annotations
        self.class_names, self.category_ids = class_names, category_ids
        self.labelled = labelled

    def __len__(self) -> int:
        return len(self.sizes)

    def image_info(self, index: int) -> ImageInfo:
        width, height = self.sizes[index]
        return ImageInfo(100 + 3 * index, f"{index}.png", width, height)  # non-contiguous ids

    def load_image(self, index: int) -> np.ndarray:
        width, height = self.sizes[index]
        return np.zeros((height, width, 3), np.uint8)

    def load_annotation(self, index: int) -> Annotation:
        return self.annotations[index]

    def labeled_classes(self, index: int) -> np.ndarray:
        if self.labelled is None:
            return super().labeled_classes(index)
        return np.array(self.labelled[index])


def box_predictor(per_image: list[tuple[np.ndarray, np.ndarray, np.ndarray]], sizes):
    """A predictor that returns, image after image (the eval loader keeps order), the given
    (boxes in original pixels, scores, classes), mapped into letterbox pixels as a model's are."""
    queue: Iterator[int] = iter(range(len(per_image)))

    def predict(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = max(len(scores) for _, scores, _ in per_image)
        boxes = np.zeros((len(images), k, 4), np.float32)
        scores = np.zeros((len(images), k), np.float32)  # padding scores 0: below the threshold
        classes = np.zeros((len(images), k), np.int64)
        for row in range(len(images)):
            index = next(queue)
            image_boxes, image_scores, image_classes = per_image[index]
            n = len(image_scores)
            matrix = letterbox_matrix(*sizes[index], IMAGE_SIZE)
            boxes[row, :n] = transform_boxes(image_boxes, matrix)
            scores[row, :n], classes[row, :n] = image_scores, image_classes
        return boxes, scores, classes

    return predict


def busy_source(seed: int = 0) -> tuple[ListSource, list]:
    """Six images of assorted sizes, four classes (ids 3, 7, 11, 20; "fish" has no ground truth),
    crowd regions; and detections: most objects found with jittered boxes, false positives,
    detections inside crowd regions and of the class without ground truth."""
    rng = np.random.default_rng(seed)
    sizes = [(96, 64), (64, 64), (120, 80), (50, 90), (64, 64), (200, 100)]
    annotations, per_image = [], []
    for width, height in sizes:
        count = int(rng.integers(2, 6))
        xy = rng.uniform(0, 0.6, (count, 2)) * (width, height)
        wh = rng.uniform(0.15, 0.4, (count, 2)) * (width, height)
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        labels = rng.integers(0, 3, count)
        crowd_boxes = boxes[:1] * 0.5 if rng.random() < 0.5 else np.zeros((0, 4), np.float32)
        annotations.append(
            Annotation(boxes[1:], labels[1:], crowd_boxes, labels[: len(crowd_boxes)])
        )
        jitter = rng.normal(0, 0.06, boxes.shape) * np.tile(wh, 2)
        false = np.concatenate([xy * 0.3, xy * 0.3 + wh * 0.5], 1)
        det_boxes = np.concatenate([boxes + jitter, false, crowd_boxes * 1.02]).astype(np.float32)
        det_classes = np.concatenate(
            [labels, rng.integers(0, 4, count), labels[: len(crowd_boxes)]]
        )
        per_image.append((det_boxes, rng.uniform(0.01, 1, len(det_boxes)), det_classes))
    names, ids = ["cat", "dog", "bird", "fish"], [3, 7, 11, 20]
    return ListSource(sizes, annotations, names, ids), per_image


@pytest.fixture(scope="module")
def busy() -> tuple[ListSource, list[dict]]:
    source, per_image = busy_source()
    predictor = box_predictor(per_image, source.sizes)
    return source, predict_source(predictor, source, IMAGE_SIZE, batch_size=4, progress=False)


def test_backends_agree(busy) -> None:
    pytest.importorskip("faster_coco_eval", reason="faster-coco-eval is not installed")
    source, detections = busy
    truth = source.to_coco()
    assert any(a["iscrowd"] for a in truth["annotations"])
    plain = coco_scores(truth, detections, source.class_names, backend="pycocotools")
    faster = coco_scores(truth, detections, source.class_names, backend="faster")
    assert 0.2 < plain.metrics["AP"] < 0.9  # a nontrivial case: neither all right nor all wrong
    assert plain.metrics["per_class_AP"]["fish"] is None  # no ground truth
    for key in (*SUMMARY_KEYS, "per_class_AP", "per_class_AP50", "num_detections"):
        assert faster.metrics[key] == pytest.approx(plain.metrics[key], abs=1e-12), key
    np.testing.assert_allclose(faster.precision, plain.precision, rtol=0, atol=1e-12)


def test_backend_choice(monkeypatch) -> None:
    with pytest.raises(ValueError, match="unknown COCO backend 'fast'"):
        coco_backend("fast")
    monkeypatch.setenv("CENTERX_COCO_BACKEND", "pycocotools")
    assert coco_backend().name == "pycocotools"
    monkeypatch.delenv("CENTERX_COCO_BACKEND")
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        assert coco_backend().name == "pycocotools"
        with pytest.raises(ValueError, match="pip install faster-coco-eval"):
            coco_backend("faster")
    else:
        assert coco_backend().name == "faster"


def test_unlabelled_class_is_not_a_false_positive() -> None:
    """Image 0 comes from a source that labels only "a", yet shows a "b" object; image 1 labels
    both. A model that finds every object exactly is perfect, but the plain evaluator counts the
    "b" on image 0 (scored highest) as a false positive: class b's precision is 1/2 throughout."""
    a_box, b_box = [4.0, 4.0, 30.0, 30.0], [34.0, 30.0, 60.0, 60.0]
    annotations = [
        Annotation(np.array([a_box], np.float32), np.array([0])),  # the "b" is there, unlabelled
        Annotation(np.array([b_box], np.float32), np.array([1])),
    ]
    source = ListSource(
        [(64, 64), (64, 64)], annotations, ["a", "b"], [1, 2], [[True, False], [True, True]]
    )
    seen = [
        (np.array([a_box, b_box], np.float32), np.array([0.9, 0.8]), np.array([0, 1])),
        (np.array([b_box], np.float32), np.array([0.7]), np.array([1])),
    ]
    detections = predict_source(box_predictor(seen, source.sizes), source, IMAGE_SIZE)
    assert len(detections) == 3

    plain = coco_scores(source.to_coco(), detections, source.class_names).metrics
    assert plain["per_class_AP"] == pytest.approx({"a": 1.0, "b": 0.5})
    assert plain["AP"] == pytest.approx(0.75)

    fair = score_detections(source, detections).metrics
    assert fair["per_class_AP"] == pytest.approx({"a": 1.0, "b": 1.0})
    assert fair["AP"] == pytest.approx(1.0) and fair["AP50"] == pytest.approx(1.0)
    # Every caller gets it: the evaluation the trainer and `eval` run.
    again = evaluate_predictor(box_predictor(seen, source.sizes), source, IMAGE_SIZE)
    assert again["AP"] == pytest.approx(1.0)


def test_eval_files_round_trip(busy, tmp_path: Path) -> None:
    source, detections = busy
    metrics = write_evaluation(source, detections, tmp_path, "busy")
    assert json.loads((tmp_path / "eval.json").read_text()) == metrics
    written = tmp_path / "detections.json"
    # The dataset's own ids, boxes in original pixels: plain pycocotools reads and scores it.
    records = json.loads(written.read_text())
    assert {r["category_id"] for r in records} <= {3, 7, 11, 20}
    assert {r["image_id"] for r in records} <= {100 + 3 * i for i in range(len(source))}
    ground_truth = COCO()
    ground_truth.dataset = source.to_coco()
    ground_truth.createIndex()
    evaluator = COCOeval(ground_truth, ground_truth.loadRes(str(written)), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(metrics["AP"], abs=1e-12)
    assert evaluator.stats[1] == pytest.approx(metrics["AP50"], abs=1e-12)
    # `eval results=` on that file: the same figures.
    rescored = score_detections(source, load_results(written, source)).metrics
    for key, value in metrics.items():
        assert rescored[key] == pytest.approx(value, abs=1e-12), key
    with Image.open(tmp_path / "pr_curves.png") as picture:
        assert picture.format == "PNG" and picture.width > 500


def test_exact_boxes_in_original_pixels_score_one(tmp_path: Path) -> None:
    """Letterboxed, non-square images: the written boxes are the ground truth's, so AP is 1."""
    source, _ = busy_source(seed=1)
    exact = [
        (ann.boxes, np.linspace(0.9, 0.5, len(ann.boxes)), ann.labels) for ann in source.annotations
    ]
    detections = predict_source(box_predictor(exact, source.sizes), source, IMAGE_SIZE)
    metrics = write_evaluation(source, detections, tmp_path, "exact")
    assert metrics["AP"] == pytest.approx(1.0)
    truth = source.to_coco()["annotations"]
    expected = sorted(a["bbox"] for a in truth if not a["iscrowd"])
    written = sorted(r["bbox"] for r in json.loads((tmp_path / "detections.json").read_text()))
    np.testing.assert_allclose(written, expected, atol=1e-3)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"annotations": []}', "holds a dict; expected a JSON list of"),
        ('[{"image_id": 100, "category_id": 3, "bbox": [0, 0, 5, 5]}]', "record 0 is"),
        ('[{"image_id": 100, "category_id": 3, "bbox": [0, 5], "score": 1}]', "record 0 is"),
        ('[{"image_id": 7, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 1}]', "image ids [7]"),
        ('[{"image_id": 100, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1}]', "ids [1]"),
        ("[{", "is not JSON"),
    ],
)
def test_bad_results_file_is_one_clear_line(tmp_path: Path, content: str, message: str) -> None:
    source, _ = busy_source()
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("[", r"\[")) as error:
        load_results(path, source)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="results file not found"):
        load_results(tmp_path / "missing.json", source)
    assert check_results([], source, "empty") == []


def test_eval_cli_scores_a_results_file(repo_root: Path, tmp_path: Path) -> None:
    """`eval results=PATH data=synthetic`: no model; the ground truth itself scores AP 1."""
    val = SyntheticShapes(num_images=6, seed=1, image_size=128)
    truth = val.to_coco()["annotations"]
    results = [
        {k: a[k] for k in ("image_id", "category_id", "bbox")} | {"score": 1.0} for a in truth
    ]
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "bad.json").write_text(json.dumps([{**results[0], "image_id": 999}]))
    command = [sys.executable, "-m", "centerx", "eval", "data=synthetic", "data.val.num_images=6"]

    def run(results_file: str, run_dir: Path) -> subprocess.CompletedProcess:
        paths = [f"results={tmp_path / results_file}", f"hydra.run.dir={run_dir}"]
        return subprocess.run(
            [*command, *paths], cwd=repo_root, capture_output=True, text=True, timeout=120
        )

    done = run("results.json", tmp_path / "run")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["AP"] == pytest.approx(1.0)
    assert (tmp_path / "run" / "pr_curves.png").is_file()
    failed = run("bad.json", tmp_path / "bad_run")
    assert failed.returncode != 0 and "names image ids [999]" in failed.stdout + failed.stderr


def test_benchmark_script_checks_both_backends_agree(tmp_path: Path, run_ok) -> None:
    pytest.importorskip("faster_coco_eval", reason="faster-coco-eval is not installed")
    out = tmp_path / "speed.json"
    size = ["--images", "12", "--dets", "20", "--classes", "5", "--repeats", "2"]
    run_ok([sys.executable, "scripts/benchmark_eval.py", *size, "--json", str(out)], 300)
    result = json.loads(out.read_text())
    assert result["images"] == 12 and result["detections"] == 12 * 20
    assert 0.0 < result["AP"] < 1.0 and set(result["median_s"]) == {"pycocotools", "faster"}
