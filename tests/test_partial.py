"""Partial labels in the data layer: relabelling, shards, unions, pseudo-labels, conf/data/union.yaml."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from centerx.data.base import Annotation, DatasetError, DetectionSource, ImageInfo
from centerx.data.partial import (
    PseudoLabeled,
    Relabeled,
    Shard,
    SourceUnion,
    build_union,
    read_pseudo_labels,
)
from centerx.data.pipeline import TrainingDataset, collate
from centerx.data.sampling import BalancedGroupSampler
from centerx.data.synthetic import SyntheticShapes
from centerx.engine.build import build_eval_source, build_sources, build_train_loader

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
FORMATS = {
    "voc": "centerx.data.voc.VOCDetection",
    "coco": "centerx.data.coco.COCODetection",
    "synthetic": "centerx.data.synthetic.SyntheticShapes",
}


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


# ---------------------------------------------------------------------------------------------
# Wrappers
# ---------------------------------------------------------------------------------------------


def test_relabeled_subsets_and_renames_by_name() -> None:
    view = Relabeled(Fixed(), ["star", "box"], {"star": "star", "box": "square"})
    assert view.class_names == ["star", "box"] and view.category_ids == [1, 2]
    image, ann = view.load(0)
    assert image.shape == (10, 10, 3)
    np.testing.assert_array_equal(ann.boxes, [[1, 1, 5, 5]])
    np.testing.assert_array_equal(ann.labels, [1])  # square -> box, index 1
    np.testing.assert_array_equal(ann.crowd_labels, [1])
    np.testing.assert_array_equal(view.load_annotation(1).labels, [0])
    # star is labelled on image 1 only, box (square) everywhere
    np.testing.assert_array_equal(view.labeled_classes(0), [False, True])
    np.testing.assert_array_equal(view.labeled_classes(1), [True, True])
    coco = view.to_coco()
    assert coco["categories"] == [{"id": 1, "name": "star"}, {"id": 2, "name": "box"}]


def test_relabeled_merges_and_leaves_unmapped_classes_unlabelled() -> None:
    view = Relabeled(Fixed(), ["shape", "other"], {"shape": ["circle", "square"]})
    np.testing.assert_array_equal(view.load_annotation(0).labels, [0, 0, 0])
    # "other" is mapped from nothing: unlabelled on every image
    np.testing.assert_array_equal(view.labeled_classes(0), [True, False])
    # a merge is labelled only where every merged class is: circle+star on image 0 is not
    merged = Relabeled(Fixed(), ["round"], {"round": ["circle", "star"]})
    assert merged.labeled_classes(0).tolist() == [False]
    assert merged.labeled_classes(1).tolist() == [True]
    # the default map keeps the classes named like a new class
    assert Relabeled(Fixed(), ["square", "cross"]).classes == {"square": ["square"]}


def test_relabeled_absent_classes_are_labelled_with_no_objects() -> None:
    view = Relabeled(Fixed(), ["circle", "cross"], ["circle"], absent=["cross"])
    assert view.labeled_classes(0).tolist() == [True, True]
    assert view.absent_classes(0).tolist() == [False, True]
    sample = TrainingDataset(view, 32)[0]
    assert sample["absent"].tolist() == [False, True]
    assert sample["heatmap"][1].max() == 0  # no objects of the absent class


@pytest.mark.parametrize(
    ("classes", "absent", "message"),
    [
        ({"circle": "hexagon"}, (), "has no class"),
        ({"triangle": "circle"}, (), "not in class_names"),
        ({"circle": ["circle"], "square": ["circle"]}, (), "mapped twice"),
        (["circle"], ["circle"], "both mapped and declared absent"),
    ],
)
def test_relabeled_errors(classes, absent, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        Relabeled(Fixed(), ["circle", "square"], classes, absent)


def test_shards_are_disjoint_and_cover_the_source() -> None:
    source = SyntheticShapes(7, seed=3, image_size=32)
    shards = [Shard(source, i, 3) for i in range(3)]
    names = [s.image_info(j).file_name for s in shards for j in range(len(s))]
    assert sorted(names) == sorted(source.image_info(i).file_name for i in range(7))
    assert [len(s) for s in shards] == [3, 2, 2]
    np.testing.assert_array_equal(
        shards[1].load_annotation(1).boxes, source.load_annotation(4).boxes
    )
    with pytest.raises(DatasetError, match="0 <= index < count"):
        Shard(source, 3, 3)


def test_union_keeps_each_parts_labels_and_prefixes_names() -> None:
    circles = Relabeled(SyntheticShapes(4, seed=5, image_size=32), ["circle", "square"], ["circle"])
    squares = Relabeled(SyntheticShapes(3, seed=6, image_size=32), ["circle", "square"], ["square"])
    union = SourceUnion([circles, squares], ["a", "b"])
    assert len(union) == 7 and union.class_names == ["circle", "square"]
    assert union.labeled_classes(0).tolist() == [True, False]
    assert union.labeled_classes(6).tolist() == [False, True]
    assert union.image_info(4).file_name.startswith("b/") and union.image_info(4).image_id == 5
    np.testing.assert_array_equal(union.load(5)[1].boxes, squares.load(1)[1].boxes)
    with pytest.raises(DatasetError, match="different class lists"):
        SourceUnion([circles, SyntheticShapes(2, image_size=32)])


def test_pseudo_labels_fill_only_unlabelled_classes(tmp_path: Path) -> None:
    source = Fixed()
    boxes = {
        # image 0: star is unlabelled -> filled; the circle box is dropped (circle is labelled)
        "0.png": (np.array([[6, 6, 9, 9], [0, 0, 3, 3]], np.float32), np.array([2, 0])),
        # image 1 labels star already: its ground truth stands alone
        "1.png": (np.array([[1, 1, 2, 2]], np.float32), np.array([2])),
    }
    filled = PseudoLabeled(source, boxes, ["star"])
    ann = filled.load_annotation(0)
    np.testing.assert_array_equal(ann.labels, [0, 1, 0, 2])
    np.testing.assert_array_equal(ann.boxes[-1], [6, 6, 9, 9])
    np.testing.assert_array_equal(ann.crowd_labels, [1])
    np.testing.assert_array_equal(filled.load(1)[1].boxes, [[5, 5, 9, 9]])
    assert filled.labeled_classes(0).all()
    with pytest.raises(DatasetError, match="cross"):
        PseudoLabeled(source, boxes, ["cross"])
    # the file format written by `run.sh pseudo_label` (COCO instances, by file name)
    path = tmp_path / "labels.json"
    path.write_text(
        json.dumps(
            {
                "images": [{"id": 7, "file_name": "0.png"}],
                "categories": [{"id": 3, "name": "star"}],
                "annotations": [{"image_id": 7, "category_id": 3, "bbox": [6, 6, 3, 3]}],
            }
        )
    )
    read, fill = read_pseudo_labels(path, source.class_names)
    assert fill == ["star"]
    np.testing.assert_array_equal(read["0.png"][0], [[6, 6, 9, 9]])
    np.testing.assert_array_equal(read["0.png"][1], [2])
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="cannot read it"):
        read_pseudo_labels(path, source.class_names)


# ---------------------------------------------------------------------------------------------
# build_union and conf/data/union.yaml
# ---------------------------------------------------------------------------------------------


def write_voc(root: Path, objects: dict[str, list[str]]) -> Path:
    """A flat VOC folder root/train: image name -> class names of its objects (one box each)."""
    folder = root / "train"
    folder.mkdir(parents=True)
    for name, classes in objects.items():
        cv2.imwrite(str(folder / f"{name}.png"), np.full((40, 40, 3), 90, np.uint8))
        boxes = "".join(
            f"<object><name>{c}</name><bndbox><xmin>{4 + 8 * i}</xmin><ymin>4</ymin>"
            f"<xmax>{10 + 8 * i}</xmax><ymax>10</ymax></bndbox></object>"
            for i, c in enumerate(classes)
        )
        (folder / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.png</filename>{boxes}</annotation>"
        )
    return root


def test_build_union_from_part_specs(tmp_path: Path) -> None:
    a = write_voc(tmp_path / "a", {"x": ["raccoon"], "y": ["raccoon", "raccoon"]})
    b = write_voc(tmp_path / "b", {"z": ["kangaroo", "dog"]})
    parts = [
        {"format": "voc", "root": str(a)},
        {"name": "roo", "format": "voc", "root": str(b), "classes": {"kangaroo": "kangaroo"}},
    ]
    union = build_union(["raccoon", "kangaroo"], parts, "train", FORMATS, train_split="train")
    assert union.names == ["part0", "roo"] and len(union) == 3
    assert union.labeled_classes(0).tolist() == [True, False]
    assert union.labeled_classes(2).tolist() == [False, True]
    np.testing.assert_array_equal(union.load_annotation(2).labels, [1])  # the dog is dropped
    only_b = build_union(
        ["kangaroo"], parts, "train", FORMATS, use_parts=["roo"], train_split="train"
    )
    assert len(only_b) == 1 and only_b.class_names == ["kangaroo"]


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ([{"format": "voc", "root": "A", "classes": ["raccoon"]}], "labelled by no part"),
        ([{"format": "xml", "root": "A"}], "unknown format 'xml'"),
        ([{"format": "voc", "root": "A", "colour": 1}], "unknown keys"),
        ([{"format": "synthetic", "train_split": {"num_images": 3}, "shard": [3, 5]}], "no images"),
        ([], "data.parts is empty"),
    ],
)
def test_build_union_errors(tmp_path: Path, parts: list, message: str) -> None:
    write_voc(tmp_path / "A", {"x": ["raccoon"]})
    for part in parts:
        if part.get("root"):
            part["root"] = str(tmp_path / part["root"])
        if part.get("format") == "synthetic":
            part["options"] = {"class_names": ["circle"]}
    names = ["circle"] if parts and parts[0]["format"] == "synthetic" else ["raccoon", "kangaroo"]
    with pytest.raises(DatasetError, match=message):
        build_union(names, parts, "train", FORMATS, train_split="train")


def compose_data(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides).data


def test_union_config_accepts_the_command_line_form(tmp_path: Path) -> None:
    a = write_voc(tmp_path / "A", {"x": ["raccoon"], "y": ["raccoon"]})
    b = write_voc(tmp_path / "B", {"z": ["kangaroo"]})
    data = compose_data(
        [
            "data=union",
            "data.class_names=[raccoon,kangaroo]",
            f"data.parts=[{{format: voc, root: {a}}}, {{format: voc, root: {b}, classes: {{kangaroo: kangaroo}}}}]",
            "data.train_split=train",
            "data.val_split=train",
        ]
    )
    train, val = build_sources(data)
    assert len(train) == 3 and train.class_names == ["raccoon", "kangaroo"]
    assert val.labeled_classes(2).tolist() == [False, True]  # val keeps the partial labels
    test = build_eval_source(data, "test", list(train.class_names))
    assert len(test) == len(val)  # no test_parts: the val parts


def test_balance_parts_draws_each_part_equally_often(tmp_path: Path) -> None:
    a = write_voc(tmp_path / "A", {f"a{i}": ["raccoon"] for i in range(6)})
    b = write_voc(tmp_path / "B", {"b0": ["kangaroo"], "b1": ["kangaroo"]})
    data = compose_data(
        [
            "data=union",
            "data.class_names=[raccoon,kangaroo]",
            f"data.parts=[{{format: voc, root: {a}}}, {{format: voc, root: {b}}}]",
            "data.train_split=train",
            "data.val_split=train",
            "data.balance_parts=true",
            "data.image_size=64",
        ]
    )
    train, _ = build_sources(data)
    loader = build_train_loader(data, train, batch_size=2, seed=0)
    sampler = loader.sampler
    assert isinstance(sampler, BalancedGroupSampler) and len(loader) == 4  # the epoch keeps 8
    for epoch in range(3):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
        assert len(drawn) == 8
        assert sorted(i for i in drawn if i >= 6) == [6, 6, 7, 7]  # B's 2 images, twice each
        assert len({i for i in drawn if i < 6}) == 4  # 4 of A's 6, none twice
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first  # a new order every epoch, the same for the same epoch
    sampler.set_epoch(0)
    assert list(sampler) == first
    ranks = [BalancedGroupSampler(sampler.groups, 0, 2, rank) for rank in (0, 1)]
    assert sorted(list(ranks[0]) + list(ranks[1])) == sorted(first)  # DDP ranks split the epoch
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 64, 64)


def test_synthetic_views_is_a_union_with_labelled_val_and_test_sets() -> None:
    data = compose_data(["data=synthetic_views"])
    train, val = build_sources(data)
    test = build_eval_source(data, "test", list(train.class_names))
    assert (len(train), len(val), len(test)) == (1024, 100, 300)
    assert train.labeled_classes(0).tolist() == [True, False]
    assert train.labeled_classes(1023).tolist() == [False, True]
    assert val.labeled_classes(0).all() and test.labeled_classes(0).all()
    teacher = compose_data(
        ["data=synthetic_views", "data.use_parts=[b]", "data.class_names=[triangle]"]
    )
    teacher_train, teacher_val = build_sources(teacher)
    assert len(teacher_train) == 512 and teacher_val.class_names == ["triangle"]


def test_collated_batches_carry_labelled_and_absent_flags() -> None:
    part = Relabeled(
        SyntheticShapes(2, seed=1, image_size=32), ["circle", "cross"], ["circle"], ["cross"]
    )
    dataset = TrainingDataset(part, 32)
    batch = collate([dataset[0], dataset[1]])
    assert batch["labeled"].tolist() == [[True, True]] * 2
    assert batch["absent"].tolist() == [[False, True]] * 2


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/datasets (real photos)")
def test_real_union_of_two_voc_datasets_labels_per_part() -> None:
    parts = [
        {"name": "fruits", "format": "voc", "root": str(SHARED / "fruits"), "val_split": "test",
         "classes": ["apple"]},
        {"name": "mask", "format": "voc", "root": str(SHARED / "mask" / "VOC2007"), "val_split": "test",
         "classes": ["mask"], "shard": [0, 2]},
    ]  # fmt: skip
    union = build_union(["apple", "mask"], parts, "train", FORMATS)
    assert len(union.parts[0]) == 240 and len(union.parts[1]) == 42
    assert union.labeled_classes(0).tolist() == [True, False]
    assert union.labeled_classes(len(union) - 1).tolist() == [False, True]
    labels = np.concatenate([union.load_annotation(i).labels for i in range(240, len(union))])
    assert len(labels) > 50 and (labels == 1).all()  # the masks, not the no-masks
    val = build_union(["apple", "mask"], parts, "val", FORMATS)
    assert len(val) == 60 + 23  # the shard applies to the val split too


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/datasets (real photos)")
def test_real_union_trains_teachers_and_distils_with_the_command_line_form(
    tmp_path: Path, run_ok
) -> None:
    """Two VOC folders with different label sets: a teacher per part, then the student with
    `distill data=union 'data.class_names=[...]' 'data.parts=[...]'` (tiny model, a few images)."""
    parts = (
        f"data.parts=[{{format: voc, root: {SHARED / 'fruits'}, classes: [apple], val_split: test, shard: [0, 24]}}, "
        f"{{format: voc, root: {SHARED / 'mask' / 'VOC2007'}, classes: {{mask: mask}}, shard: [0, 8]}}]"
    )
    fast = ["data=union", parts, "data.image_size=64", "data.num_workers=0", "train.epochs=1",
            "train.batch_size=8", "train.progress=false", "samples.count=1", "eval.num_workers=0"]  # fmt: skip
    teachers = {}
    for part, name in (("part0", "apple"), ("part1", "mask")):
        run = tmp_path / name
        run_ok([sys.executable, "-m", "centerx", "train", *fast, f"data.use_parts=[{part}]",
                f"data.class_names=[{name}]", f"hydra.run.dir={run}"], 300)  # fmt: skip
        teachers[name] = run / "checkpoints" / "best.pt"
    taught = ", ".join(
        f"{n}: {{checkpoint: {p}, classes: {{{n}: {n}}}}}" for n, p in teachers.items()
    )
    student = tmp_path / "student"
    run_ok([sys.executable, "-m", "centerx", "distill", *fast, "data.class_names=[apple,mask]",
            f"objective.teachers={{{taught}}}", f"hydra.run.dir={student}"], 300)  # fmt: skip
    scored = json.loads((student / "eval.json").read_text())
    assert set(scored["per_class_AP"]) == {"apple", "mask"}
    assert (student / "detections.json").is_file() and (
        student / "checkpoints" / "best.pt"
    ).is_file()
