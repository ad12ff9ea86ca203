"""The main job (centerx.engine.story) shrunk to a smoke test, and the source wrappers it uses."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from centerx.data.base import Annotation, DatasetError, DetectionSource, ImageInfo
from centerx.data.pipeline import SourceUnion
from centerx.data.synthetic import SyntheticShapes
from centerx.data.views import ClassSubset, PseudoLabeled
from centerx.engine.story import MODELS, override_value, view_source

REPO = Path(__file__).resolve().parents[1]


class Fixed(DetectionSource):
    """Two images with known boxes; class 2 ('star') is labelled on image 1 only."""

    def __init__(self) -> None:
        self.class_names = ["circle", "square", "star"]
        self.category_ids = [1, 2, 3]
        self.anns = [
            Annotation(
                np.array([[0, 0, 4, 4], [1, 1, 5, 5], [2, 2, 6, 6]], np.float32),
                np.array([0, 1, 0], np.int64),
                np.array([[3, 3, 7, 7]], np.float32),
                np.array([1], np.int64),
            ),
            Annotation(np.array([[5, 5, 9, 9]], np.float32), np.array([2], np.int64)),
        ]

    def __len__(self) -> int:
        return 2

    def image_info(self, index: int) -> ImageInfo:
        return ImageInfo(index + 1, f"{index}.png", 10, 10)

    def load_image(self, index: int) -> np.ndarray:
        return np.full((10, 10, 3), index, np.uint8)

    def load_annotation(self, index: int) -> Annotation:
        return self.anns[index]

    def labeled_classes(self, index: int) -> np.ndarray:
        return np.array([True, True, index == 1])


def test_class_subset_remaps_labels_and_ids() -> None:
    subset = ClassSubset(Fixed(), ["star", "square"])
    assert subset.class_names == ["star", "square"]
    assert subset.category_ids == [1, 2]
    assert len(subset) == 2 and subset.image_info(1).file_name == "1.png"
    image, ann = subset.load(0)
    assert image.shape == (10, 10, 3)
    np.testing.assert_array_equal(ann.boxes, [[1, 1, 5, 5]])
    np.testing.assert_array_equal(ann.labels, [1])  # square is index 1 of the subset
    np.testing.assert_array_equal(ann.crowd_labels, [1])
    np.testing.assert_array_equal(subset.load_annotation(1).labels, [0])  # star
    np.testing.assert_array_equal(subset.labeled_classes(0), [False, True])
    coco = subset.to_coco()
    assert coco["categories"] == [{"id": 1, "name": "star"}, {"id": 2, "name": "square"}]
    assert sorted(a["category_id"] for a in coco["annotations"]) == [1, 2, 2]
    assert ClassSubset(Fixed()).class_names == Fixed().class_names  # None keeps every class
    with pytest.raises(DatasetError, match="cross"):
        ClassSubset(Fixed(), ["cross"])


def test_class_subset_of_a_partial_view_matches_the_synthetic_labels() -> None:
    view = SyntheticShapes(
        8, seed=3, class_names=["circle", "square"], labeled_class_names=["circle"]
    )
    subset = ClassSubset(view, ["circle"])
    for index in range(len(view)):
        full = view.load_annotation(index)
        ann = subset.load_annotation(index)
        np.testing.assert_array_equal(ann.boxes, full.boxes[full.labels == 0])
        assert (ann.labels == 0).all()
        assert subset.labeled_classes(index).tolist() == [True]


def test_pseudo_labeled_fills_only_unlabelled_classes() -> None:
    source = Fixed()
    detections = [
        # image 0: star is unlabelled -> filled; the circle detection is dropped (labelled)
        (np.array([[6, 6, 9, 9], [0, 0, 3, 3]], np.float32), np.array([2, 0])),
        # image 1 labels star already: its ground truth stands alone
        (np.array([[1, 1, 2, 2]], np.float32), np.array([2])),
    ]
    filled = PseudoLabeled(source, detections, ["star"])
    assert filled.class_names == source.class_names
    ann = filled.load_annotation(0)
    np.testing.assert_array_equal(ann.labels, [0, 1, 0, 2])
    np.testing.assert_array_equal(ann.boxes[-1], [6, 6, 9, 9])
    np.testing.assert_array_equal(ann.crowd_labels, [1])
    np.testing.assert_array_equal(filled.load(1)[1].labels, [2])
    np.testing.assert_array_equal(filled.load(1)[1].boxes, [[5, 5, 9, 9]])
    assert filled.labeled_classes(0).all() and filled.labeled_classes(1).all()
    # a mapping may leave images out; an Annotation works as an entry
    sparse = PseudoLabeled(source, {0: Annotation(detections[0][0], detections[0][1])}, ["star"])
    np.testing.assert_array_equal(sparse.load_annotation(0).labels, [0, 1, 0, 2])
    np.testing.assert_array_equal(sparse.load_annotation(1).labels, [2])
    with pytest.raises(DatasetError, match="1 images"):
        PseudoLabeled(source, detections[:1], ["star"])
    with pytest.raises(DatasetError, match="cross"):
        PseudoLabeled(source, detections, ["cross"])


def test_view_source_joins_views_and_keeps_classes() -> None:
    views = {
        "a": {"labeled": ["circle"], "seed": 5, "num_images": 4},
        "b": {"labeled": ["square"], "seed": 6, "num_images": 3},
    }
    union = view_source(["circle", "square"], views, ["a", "b"])
    assert len(union) == 7 and union.class_names == ["circle", "square"]
    assert union.labeled_classes(0).tolist() == [True, False]
    assert union.labeled_classes(6).tolist() == [False, True]
    assert isinstance(union.source, SourceUnion)
    teacher = view_source(["circle", "square"], views, ["b"], keep=["square"])
    assert len(teacher) == 3 and teacher.class_names == ["square"]
    assert teacher.labeled_classes(0).tolist() == [True]
    with pytest.raises(ValueError, match="unknown views"):
        view_source(["circle", "square"], views, ["c"])


@pytest.mark.parametrize(
    "value",
    [None, True, 3, 0.002, "torch.optim.AdamW", "x y", "1", "null", ["a", "b"], {"k": {"c": "c"}}],
)
def test_override_values_read_back(value) -> None:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"+probe={override_value(value)}"])
    assert OmegaConf.to_container(cfg, resolve=True)["probe"] == value


@pytest.mark.slow
def test_main_job_smoke(tmp_path: Path, run_ok) -> None:
    run = tmp_path / "run"
    run_ok(
        [sys.executable, "-m", "centerx", "main", "experiment=fast_story", f"hydra.run.dir={run}"],
        300,
    )
    for name in ("report.md", "report.json", "comparison.png", "predictions/predictions.json"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    assert set(report["models"]) == set(MODELS)
    assert report["class_owner"] == {"circle": "teacher_a", "triangle": "teacher_b"}
    for name, figures in report["models"].items():
        assert {"AP", "AP50", "per_class_AP"} <= set(figures), name
        values = [figures["AP"], figures["AP50"], *figures["per_class_AP"].values()]
        assert all(isinstance(v, float | int) and 0.0 <= v <= 1.0 for v in values), name
        assert (run / name / "checkpoints" / "best.pt").is_file()
        assert (run / name / "metrics.jsonl").is_file()
    assert list(report["models"]["teacher_a"]["per_class_AP"]) == ["circle"]
    assert list(report["models"]["teacher_b"]["per_class_AP"]) == ["triangle"]
    for name in ("student", "naive_merge", "ignore_unlabelled", "pseudo_label"):
        assert list(report["models"][name]["per_class_AP"]) == ["circle", "triangle"]
    text = (run / "report.md").read_text()
    assert "| student |" in text and "bash run.sh distill" in text
    predictions = json.loads((run / "predictions" / "predictions.json").read_text())
    assert len(predictions["images"]) == 2
    try:
        import centerx_export.onnx_export  # noqa: F401
    except ImportError:
        pass
    else:  # with the exporter installed the student is exported, and predicts via ONNX
        assert (run / "student" / "model.onnx").is_file()
        assert report["export"] == str(run / "student" / "model.onnx")

    # The printed eval command of a row gives that row's figures.
    train_command, eval_command = report["models"]["student"]["commands"]
    assert train_command.startswith("bash run.sh distill ")
    args = shlex.split(eval_command)[2:]
    args = [a for a in args if not a.startswith("hydra.run.dir=")]
    run_ok([sys.executable, "-m", "centerx", *args, f"hydra.run.dir={tmp_path / 'eval'}"], 120)
    scored = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert scored["AP"] == pytest.approx(report["models"]["student"]["AP"], abs=1e-9)
    assert scored["per_class_AP"] == pytest.approx(report["models"]["student"]["per_class_AP"])
