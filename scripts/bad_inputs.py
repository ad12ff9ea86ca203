"""Bad inputs and faults, tried against the CLI as a new user would; a verdict for each.

    .venv/bin/python scripts/bad_inputs.py                 # every case, then the counts
    .venv/bin/python scripts/bad_inputs.py --only lr_nan ctrl_c --keep /tmp/bad_inputs
    .venv/bin/python scripts/bad_inputs.py --list

Verdicts:
  clear    exit code and the one-line `centerx: error: ...` expected (no traceback)
  skip     a counted skip: the run finished, and a warning counts what it skipped
  handled  the run finished doing the right thing (checked), with the warning expected
  unclear  it failed, but not with the expected exit code or message
  silent   exit 0 where an error or a warning was due
  traceback, hang (no exit within the limit), loss (an earlier run's files changed)

CASES is also the table tests/test_bad_inputs.py runs (it loads this file by path), one test per
case: a case passes when its verdict is the one it expects. Everything happens in a temporary
workspace: a tiny synthetic run to resume and evaluate, broken files, small VOC/COCO/YOLO sets
written from the synthetic shapes. Most cases run in this process (`centerx.cli.main`, output
captured); signals, locks, mounts and torchrun get their own processes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import torch

from centerx.errors import run_script

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180  # a case still running after this is a hang
# The tiny synthetic run every training case starts from: 64 px, 16 + 8 images, no workers.
FAST = (
    "train.progress=false", "train.num_threads=1", "train.batch_size=8", "train.epochs=1",
    "data.num_workers=0", "data.image_size=64", "data.train.image_size=64",
    "data.val.image_size=64", "data.train.num_images=16", "data.val.num_images=8",
    "samples.count=1",
)  # fmt: skip
# The same for file datasets (no synthetic-only keys).
FAST_FILES = (
    "train.progress=false", "train.num_threads=1", "train.batch_size=4", "train.epochs=1",
    "data.num_workers=0", "data.image_size=64", "samples.count=1",
)  # fmt: skip
CLASSES = ("circle", "square", "triangle")
VERDICTS = ("clear", "skip", "handled", "unclear", "silent", "traceback", "hang", "loss")


# ---------------------------------------------------------------------------------------------
# The workspace: runs and files the cases point at
# ---------------------------------------------------------------------------------------------


def _shapes(count: int, seed: int):
    from centerx.data.synthetic import SyntheticShapes

    return SyntheticShapes(num_images=count, seed=seed, class_names=CLASSES, image_size=64)


def write_voc(root: Path, split: str, count: int, seed: int) -> list[Path]:
    """A flat VOC split: root/split/NAME.png beside NAME.xml; the image paths."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    paths, shapes = [], _shapes(count, seed)
    for index in range(count):
        image, ann = shapes.load(index)
        path = folder / f"{split}_{index}.png"
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        objects = "".join(
            f"<object><name>{CLASSES[label]}</name><difficult>0</difficult><bndbox>"
            f"<xmin>{x0:.0f}</xmin><ymin>{y0:.0f}</ymin><xmax>{x1:.0f}</xmax><ymax>{y1:.0f}</ymax>"
            "</bndbox></object>"
            for (x0, y0, x1, y1), label in zip(ann.boxes.tolist(), ann.labels.tolist(), strict=True)
        )
        path.with_suffix(".xml").write_text(
            f"<annotation><filename>{path.name}</filename><size><width>64</width>"
            f"<height>64</height><depth>3</depth></size>{objects}</annotation>"
        )
        paths.append(path)
    return paths


def write_coco(root: Path, split: str, count: int, seed: int) -> Path:
    """root/annotations/instances_{split}.json + root/{split}/*.png; the JSON's path."""
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations, shapes = [], [], _shapes(count, seed)
    for index in range(count):
        image, ann = shapes.load(index)
        name = f"{split}_{index}.png"
        cv2.imwrite(str(root / split / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        images.append({"id": index + 1, "file_name": name, "width": 64, "height": 64})
        for (x0, y0, x1, y1), label in zip(ann.boxes.tolist(), ann.labels.tolist(), strict=True):
            annotations.append(
                {"id": len(annotations) + 1, "image_id": index + 1, "category_id": label + 1,
                 "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
            )  # fmt: skip
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(data))
    return path


def write_yolo(root: Path, split: str, count: int, seed: int) -> Path:
    """root/images/{split} + root/labels/{split} + root/classes.txt; the label folder."""
    images, labels = root / "images" / split, root / "labels" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    shapes = _shapes(count, seed)
    for index in range(count):
        image, ann = shapes.load(index)
        cv2.imwrite(str(images / f"{index}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        lines = [
            f"{label} {(x0 + x1) / 128:.4f} {(y0 + y1) / 128:.4f} {(x1 - x0) / 64:.4f} "
            f"{(y1 - y0) / 64:.4f}"
            for (x0, y0, x1, y1), label in zip(ann.boxes.tolist(), ann.labels.tolist(), strict=True)
        ]
        (labels / f"{index}.txt").write_text("\n".join(lines) + "\n")
    return labels


def voc_set(root: Path) -> Path:
    write_voc(root, "train", 8, seed=0)
    write_voc(root, "test", 4, seed=1)
    return root


@dataclass
class Workspace:
    root: Path

    @property
    def base(self) -> Path:
        """A finished 2-epoch synthetic run (checkpoints/last.pt and best.pt)."""
        return self.root / "base_run"

    @property
    def files(self) -> Path:
        return self.root / "files"

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def build(self) -> None:
        """The shared run and files (the datasets are written by the cases that need them)."""
        result = run_inprocess(["train", *FAST, "train.epochs=2", f"hydra.run.dir={self.base}"])
        if result.code != 0:
            raise RuntimeError(f"the base run failed:\n{result.stdout[-3000:]}{result.stderr}")
        files = self.files
        files.mkdir(parents=True, exist_ok=True)
        data = (self.base / "checkpoints" / "last.pt").read_bytes()
        (files / "truncated.pt").write_bytes(data[: len(data) // 2])
        (files / "empty.pt").write_bytes(b"")
        (files / "text.pt").write_text("not a checkpoint\n")
        (files / "folder.pt").mkdir()
        (files / "model.onnx").write_bytes(b"\x08\x01garbage, not an ONNX model")
        (files / "a_file").write_text("a regular file\n")
        (files / "no_images").mkdir()
        (files / "no_images" / "notes.txt").write_text("no images here\n")
        (files / "bad_images").mkdir()
        for name in ("a.jpg", "b.png"):
            (files / "bad_images" / name).write_bytes(b"not an image")

    def copy_base(self, run: Path) -> None:
        shutil.copytree(self.base, run)


def fingerprint(directory: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file of a run, to see whether a case touched it (not the lock
    file, which every claim rewrites, nor Hydra's log, which every start opens)."""
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in (".centerx.lock", "cli.log")
    }


# ---------------------------------------------------------------------------------------------
# Running a command
# ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    code: int | None  # None: did not end in time
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_inprocess(args: list[str]) -> Result:
    """`centerx ARGS` in this process (Hydra's log handlers write to the captured stdout)."""
    from centerx import cli

    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(args)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # what the interpreter would print on the way out
            traceback.print_exc()
            code = 1
    return Result(code, out.getvalue(), err.getvalue(), time.perf_counter() - started)


def start(command: list[str], env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a hang is killed with all its children
    )


def finish(process: subprocess.Popen, started: float, timeout: float = TIMEOUT_S) -> Result:
    try:
        out, err = process.communicate(timeout=max(1.0, timeout - (time.perf_counter() - started)))
        code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        code = None
    return Result(code, out, err, time.perf_counter() - started)


def centerx_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "centerx", *args]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = TIMEOUT_S) -> bool:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline and process.poll() is None:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


def unshare_works() -> bool:
    """Whether this user may mount a tmpfs in a private namespace (unshare -rm)."""
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return done.returncode == 0


# ---------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """`centerx ARGS hydra.run.dir=RUN`. {ws}, {run}, {base}, {files} in ARGS are filled in.

    expect: clear (exit `code`, the `centerx: error:` line matches `message`), skip or handled
    (exit `code`, some output line matches `message`, and `check` finds nothing wrong)."""

    name: str
    args: tuple[str, ...]
    code: int
    message: str
    expect: str = "clear"
    mode: str = "inprocess"  # inprocess | subprocess | signal | concurrent | mount | torchrun
    setup: Callable[[Workspace, Path], None] | None = None
    check: Callable[[Workspace, Path, Result], str | None] | None = None
    protect: bool = False  # the run dir holds an earlier run that must come out unchanged
    extra: dict = field(default_factory=dict)  # mode options (signal, mount size, ...)
    slow: bool = False

    def command(self, ws: Workspace, run: Path) -> list[str]:
        values = {"ws": ws.root, "run": run, "base": ws.base, "files": ws.files}
        args = [arg.format(**values) for arg in self.args]
        if not any(arg.startswith("hydra.run.dir=") for arg in args):
            args.append(f"hydra.run.dir={run}")
        return args


def train(*overrides: str) -> tuple[str, ...]:
    return ("train", *FAST, *overrides)


def voc_train(*overrides: str) -> tuple[str, ...]:
    return ("train", "data=voc", "data.root={run}/data", *FAST_FILES, *overrides)


def coco_train(*overrides: str) -> tuple[str, ...]:
    return ("train", "data=coco", "data.root={run}/coco", *FAST_FILES, *overrides,
            "data.train_ann=annotations/instances_train.json",
            "data.val_ann=annotations/instances_val.json")  # fmt: skip


# setups ---------------------------------------------------------------------------------------


def copy_base(ws: Workspace, run: Path) -> None:
    ws.copy_base(run)


def with_voc(mutate: Callable[[Path], None] | None = None) -> Callable[[Workspace, Path], None]:
    def setup(ws: Workspace, run: Path) -> None:
        data = voc_set(run / "data")
        if mutate is not None:
            mutate(data)

    return setup


def break_images(split: str, count: int | None) -> Callable[[Path], None]:
    def mutate(data: Path) -> None:
        images = sorted((data / split).glob("*.png"))
        for image in images if count is None else images[:count]:
            image.write_bytes(b"not an image")

    return mutate


def remove_first_image(split: str) -> Callable[[Path], None]:
    def mutate(data: Path) -> None:
        sorted((data / split).glob("*.png"))[0].unlink()

    return mutate


def drop_objects(split: str, keep_class: str | None = None) -> Callable[[Path], None]:
    """Remove every <object> (or all but those of keep_class) from a split's XMLs."""

    def mutate(data: Path) -> None:
        import xml.etree.ElementTree as ET

        for xml in (data / split).glob("*.xml"):
            tree = ET.parse(xml)
            for obj in tree.getroot().findall("object"):
                if obj.findtext("name") != keep_class:
                    tree.getroot().remove(obj)
            tree.write(xml)

    return mutate


def bad_voc_number(data: Path) -> None:
    xml = sorted((data / "train").glob("*.xml"))[2]
    xml.write_text(xml.read_text().replace("<xmin>", "<xmin>abc", 1))


def coco_bad_bbox(width: object) -> Callable[[Workspace, Path], None]:
    """A COCO set whose annotation id 2 has this width."""

    def setup(ws: Workspace, run: Path) -> None:
        path = write_coco(run / "coco", "train", 6, seed=0)
        write_coco(run / "coco", "val", 3, seed=1)
        data = json.loads(path.read_text())
        data["annotations"][1]["bbox"][2] = width
        path.write_text(json.dumps(data))

    return setup


def yolo_bad_line(ws: Workspace, run: Path) -> None:
    labels = write_yolo(run / "yolo", "train", 6, seed=0)
    write_yolo(run / "yolo", "val", 3, seed=1)
    (labels / "3.txt").write_text("0 0.5 0.5 nan 0.2\n")


def metrics_after_checkpoint(ws: Workspace, run: Path) -> None:
    """The base run, as a kill in epoch 3 leaves it: records after last.pt's step."""
    ws.copy_base(run)
    with open(run / "metrics.jsonl", "a") as handle:
        for step in (5, 6):
            handle.write(json.dumps({"kind": "step", "step": step, "epoch": 2, "loss": 1.0}) + "\n")


def stale_lock_and_tmp(ws: Workspace, run: Path) -> None:
    """The base run after a kill: a lock file naming a dead process, a half-written checkpoint."""
    ws.copy_base(run)
    (run / ".centerx.lock").write_text("999999\n")
    (run / "checkpoints" / "last.pt.tmp").write_bytes(b"half a checkpoint")


def make_file(ws: Workspace, run: Path) -> None:
    run.parent.mkdir(parents=True, exist_ok=True)
    run.write_text("a regular file where the run directory should go\n")


# checks ----------------------------------------------------------------------------------------


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def check_finished(ws: Workspace, run: Path, result: Result) -> str | None:
    missing = [n for n in ("checkpoints/best.pt", "eval.json") if not (run / n).is_file()]
    return f"missing {missing}" if missing else None


def check_no_duplicate_steps(ws: Workspace, run: Path, result: Result) -> str | None:
    steps = [r["step"] for r in records(run) if r["kind"] == "step"]
    epochs = [r["epoch"] for r in records(run) if r["kind"] == "epoch"]
    if steps != sorted(set(steps)) or epochs != sorted(set(epochs)):
        return f"metrics.jsonl repeats records: steps {steps}, epochs {epochs}"
    return check_finished(ws, run, result)


def check_overwritten(ws: Workspace, run: Path, result: Result) -> str | None:
    epochs = [r["epoch"] for r in records(run) if r["kind"] == "epoch"]
    return (
        f"old records kept: epochs {epochs}" if epochs != [1] else check_finished(ws, run, result)
    )


def check_stale_files_gone(ws: Workspace, run: Path, result: Result) -> str | None:
    if (run / "checkpoints" / "last.pt.tmp").exists():
        return "the stale last.pt.tmp is still there"
    return check_no_duplicate_steps(ws, run, result)


def check_resumable(ws: Workspace, run: Path, result: Result) -> str | None:
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    return None if state["epoch"] >= 1 else f"last.pt holds epoch {state['epoch']}"


def check_null_ap(ws: Workspace, run: Path, result: Result) -> str | None:
    per_class = json.loads((run / "eval.json").read_text())["per_class_AP"]
    return None if per_class["square"] is None else f"square's AP is {per_class['square']}"


def check_no_redraws(ws: Workspace, run: Path, result: Result) -> str | None:
    return "progress redraws (\\r) in the log" if "\r" in result.output else None


# The ctrl_c / sigterm / lock runs: long enough to catch, no evaluation before the last epoch.
# Runs that are stopped from outside (a signal, a second run): far more epochs than they get,
# so that a harness slowed down by a loaded machine still finds them training (at 30 epochs a
# loaded CI machine once saw the run finish before its Ctrl-C arrived).
DATA = ("data.train.num_images=32", "train.epochs=1000", "train.eval_every=100")

CASES: tuple[Case, ...] = (
    # --- the command line and the configuration: exit 2 before any data is read -------------
    Case("unknown_subcommand", ("trian",), 2, r"unknown subcommand 'trian' \(choose one of"),
    Case("unknown_key", train("train.epochz=3"), 2, r"Could not override 'train\.epochz'"),
    Case("malformed_override", train("train.lr"), 2, r"Error parsing override 'train\.lr'"),
    Case("unknown_config_option", train("data=nope"), 2, r"Could not find 'data/nope'"),
    Case("image_size_100", train("data.image_size=100"), 2, r"data\.image_size=100 must be"),
    Case("image_size_0", train("data.image_size=0"), 2, r"data\.image_size=0 must be"),
    Case("lr_negative", train("train.lr=-0.01"), 2, r"train\.lr=-0\.01 must be"),
    Case("lr_nan", train("train.lr=nan"), 2, r"train\.lr=nan must be a finite number"),
    Case("lr_text", train("train.lr=abc"), 2, r"train\.lr='abc' must be"),
    Case("batch_size_0", train("train.batch_size=0"), 2, r"train\.batch_size=0 must be"),
    Case("epochs_0", train("train.epochs=0"), 2, r"train\.epochs=0 must be"),
    Case("epochs_fraction", train("train.epochs=1.5"), 2, r"train\.epochs=1\.5 must be an integer"),
    Case("eval_every_0", train("train.eval_every=0"), 2, r"train\.eval_every=0 must be"),
    Case("warmup_negative", train("train.warmup_epochs=-1"), 2, r"train\.warmup_epochs=-1"),
    Case("unknown_schedule", train("train.schedule=linear"), 2, r"unknown train\.schedule"),
    Case("workers_negative", train("data.num_workers=-1"), 2, r"data\.num_workers=-1 must be"),
    Case("cuda_without_gpu", train("train.device=cuda"), 2, r"train\.device=cuda but no CUDA"),
    Case("voc_without_root", ("train", "data=voc"), 2, r"data\.root is not set"),
    Case("voc_root_missing", ("train", "data=voc", "data.root={ws}/nope"), 2,
         r"data\.root=.*/nope does not exist"),
    Case("coco_root_is_a_file", ("train", "data=coco", "data.root={files}/a_file"), 2,
         r"data\.root=.*a_file is a file, not a folder"),
    Case("unknown_backbone", train("model.backbone=nope"), 2,
         r"unknown model\.backbone='nope'; available: \[.*'tiny'"),
    Case("unknown_optimizer", train("train.optimizer._target_=torch.optim.Nope"), 2,
         r"Error locating target 'torch\.optim\.Nope'"),
    Case("init_from_missing", train("model.init_from={ws}/nope.pt"), 2,
         r"model\.init_from=.*nope\.pt is not a file"),
    Case("overwrite_not_bool", train("overwrite=maybe"), 2, r"overwrite='maybe' must be true"),
    Case("freeze_too_many_stages", train("model.freeze_stages=99"), 2,
         r"model\.freeze_stages=99: TinyBackbone has \d+ pieces"),
    Case("cache_negative", train("data.cache=-1"), 2, r"data\.cache=-1 must be"),
    Case("union_class_in_no_part", ("train", "data=union", *FAST_FILES, "data.class_names=[circle,moon]",
         "data.parts=[{{format: voc, root: {run}/data, train_split: train, val_split: test}}]"), 1,
         r"class\(es\) \['moon'\] are labelled by no part", setup=with_voc()),
    Case("union_unknown_format", ("train", "data=union", *FAST_FILES, "data.class_names=[circle]",
         "data.parts=[{{format: xml, root: {ws}}}]"), 1, r"part 'part0': unknown format 'xml'"),
    Case("distill_without_teachers", ("distill", *FAST), 2, r"no teachers configured"),
    Case("distill_teacher_missing", ("distill", *FAST,
         "+objective.teachers.a={{checkpoint: {ws}/nope.pt, classes: {{circle: circle}}}}"), 1,
         r"teacher 'a'.*not found"),
    Case("distill_teacher_class_unknown", ("distill", *FAST,
         "+objective.teachers.a={{checkpoint: {base}/checkpoints/best.pt, classes: {{circle: moon}}}}"),
         2, r"moon"),
    Case("distill_fixed_weights", ("distill", *FAST, "loss=fixed",
         "+objective.teachers.a={{checkpoint: {base}/checkpoints/best.pt, classes: {{circle: circle, "
         "square: square, triangle: triangle}}}}"),
         2, r"the loss weighter FixedWeights has no entry for loss term"),
    # --- checkpoints and models: exit 1 naming the file ---------------------------------------
    Case("eval_without_checkpoint", ("eval",), 2, r"say which model"),
    Case("eval_missing_checkpoint", ("eval", "checkpoint={ws}/nope.pt"), 1,
         r"checkpoint not found: .*nope\.pt"),
    Case("eval_truncated_checkpoint", ("eval", "checkpoint={files}/truncated.pt"), 1,
         r"cannot read checkpoint .*truncated\.pt"),
    Case("eval_empty_checkpoint", ("eval", "checkpoint={files}/empty.pt"), 1,
         r"cannot read checkpoint .*empty\.pt"),
    Case("eval_text_checkpoint", ("eval", "checkpoint={files}/text.pt"), 1,
         r"cannot read checkpoint .*text\.pt"),
    Case("eval_folder_checkpoint", ("eval", "checkpoint={files}/folder.pt"), 1,
         r"folder\.pt is a folder"),
    Case("eval_corrupt_onnx", ("eval", "checkpoint={files}/model.onnx"), 1, r"model\.onnx"),
    Case("export_onnx_as_checkpoint", ("export", "checkpoint={files}/model.onnx"), 1,
         r"model\.onnx"),
    Case("resume_missing", train("train.epochs=3", "train.resume={ws}/nope/last.pt"), 2,
         r"train\.resume=.*nope/last\.pt does not exist"),
    Case("resume_text_file", train("train.epochs=3", "train.resume={files}/text.pt"), 1,
         r"cannot read checkpoint .*text\.pt"),
    Case("resume_other_backbone", train("train.epochs=3", "model.backbone=resnet18",
         "train.resume={base}/checkpoints/last.pt"), 1,
         r"was trained with backbone 'tiny', but this run builds 'resnet18'"),
    Case("resume_other_classes", train("train.epochs=3", "data.class_names=[circle,square]",
         "train.resume={base}/checkpoints/last.pt"), 1, r"has 3 classes .* but this run has 2"),
    Case("resume_other_batch_size", train("train.epochs=3", "train.batch_size=4",
         "train.resume={base}/checkpoints/last.pt"), 2,
         r"cannot resume .*last\.pt with changed train\.batch_size: 8 -> 4"),
    Case("resume_fewer_epochs", train("train.epochs=2", "train.resume={base}/checkpoints/last.pt"),
         2, r"holds epoch 2: train\.epochs=2 leaves nothing to train"),
    # --- data ---------------------------------------------------------------------------------
    Case("voc_bad_number", voc_train(), 1, r"train_2\.xml.*xmin", setup=with_voc(bad_voc_number)),
    Case("coco_text_in_bbox", coco_train(), 1, r"instances_train\.json: annotation id 2.*bbox",
         setup=coco_bad_bbox("abc")),
    Case("coco_negative_width", coco_train(), 0,
         r"instances_train\.json: skipped \d+ of \d+ boxes: 1 with zero or negative width",
         expect="skip", setup=coco_bad_bbox(-5.0), check=check_finished),
    Case("yolo_nan_size", ("train", "data=yolo", "data.root={run}/yolo", *FAST_FILES), 1,
         r"3\.txt:1 .*'nan'", setup=yolo_bad_line),
    Case("some_images_unreadable", voc_train(), 0,
         r"2 unreadable training images were skipped, \d+ times", expect="skip",
         setup=with_voc(break_images("train", 2)), check=check_finished),
    Case("all_images_unreadable", voc_train(), 1, r"training images in a row could not be read",
         setup=with_voc(break_images("train", None))),
    Case("val_image_missing", voc_train(), 0, r"skipping unreadable image: .*test_0\.png",
         expect="skip", setup=with_voc(remove_first_image("test")), check=check_finished),
    Case("no_boxes_anywhere", voc_train("data.class_names=[circle,square,triangle]"), 1, r"the validation set \(4 images\) holds no box",
         setup=with_voc(lambda d: (drop_objects("train")(d), drop_objects("test")(d)))),
    Case("no_training_boxes", voc_train("data.class_names=[circle,square,triangle]"), 0,
         r"held no object of the classes", expect="handled",
         setup=with_voc(drop_objects("train")), check=check_finished),
    Case("class_without_val_boxes", voc_train("data.class_names=[circle,square,triangle]"), 0,
         r"the validation set holds no box of \['square', 'triangle'\]: their AP is n/a",
         expect="handled", setup=with_voc(drop_objects("test", keep_class="circle")),
         check=check_null_ap),
    # --- predict ------------------------------------------------------------------------------
    Case("predict_without_input", ("predict", "checkpoint={base}/checkpoints/best.pt"), 2,
         r"say what to predict on"),
    Case("predict_missing_input", ("predict", "checkpoint={base}/checkpoints/best.pt",
         "input={ws}/nope"), 1, r"input .*nope does not exist"),
    Case("predict_folder_without_images", ("predict", "checkpoint={base}/checkpoints/best.pt",
         "input={files}/no_images"), 1, r"no input files found in .*no_images"),
    Case("predict_unreadable_images", ("predict", "checkpoint={base}/checkpoints/best.pt",
         "input={files}/bad_images"), 1, r"no input could be read"),
    # --- run directories ----------------------------------------------------------------------
    Case("run_dir_under_a_file", train("hydra.run.dir={run}/sub"), 1,
         r"(Not a directory|File exists).*run_dir_under_a_file", setup=make_file),
    Case("run_dir_holds_a_run", train(), 2, r"already holds a run .*continue it with train\.resume=.*overwrite=true",
         setup=copy_base, protect=True),
    Case("eval_dir_holds_an_eval", ("eval", "checkpoint={base}/checkpoints/best.pt"), 2,
         r"already holds \['eval\.json', 'detections\.json', 'pr_curves\.png'\]",
         setup=copy_base, protect=True),
    Case("overwrite_true", train("overwrite=true"), 0, r"overwrite=true: deleted the previous",
         expect="handled", setup=copy_base, check=check_overwritten),
    Case("resume_same_dir", train("train.epochs=3", "train.resume={run}/checkpoints/last.pt"), 0,
         r"resumed from .*last\.pt at epoch 2", expect="handled", setup=metrics_after_checkpoint,
         check=check_no_duplicate_steps),
    Case("resume_new_dir", train("train.epochs=3", "train.resume={base}/checkpoints/last.pt"), 0,
         r"copied the run's best\.pt", expect="handled", check=check_finished),
    Case("resume_new_lr", train("train.epochs=3", "train.lr=0.001",
         "train.resume={base}/checkpoints/last.pt"), 0,
         r"resuming with changed settings, applied: .*train\.lr: 0\.004 -> 0\.001",
         expect="handled", check=check_finished),
    Case("stale_lock_and_tmp", train("train.epochs=3", "train.resume={run}/checkpoints/last.pt"), 0,
         r"removing .*last\.pt\.tmp", expect="handled", setup=stale_lock_and_tmp,
         check=check_stale_files_gone),
    Case("two_runs_one_dir", train(*DATA), 1,
         r"run directory .* is in use by another centerx process \(pid \d+\)", mode="concurrent"),
    Case("read_only_disk", train(), 1, r"Read-only file system", mode="mount",
         extra={"options": "ro,size=1m"}),
    Case("disk_full", train(), 1, r"No space left on device: .*\.pt", mode="mount",
         extra={"options": "size=1m"}),
    # --- interruptions, divergence, logs --------------------------------------------------------
    Case("ctrl_c", train(*DATA), 130,
         r"interrupted in epoch \d+; checkpoints/last\.pt holds epoch \d+ \(resume with: "
         r"train\.resume=", mode="signal", extra={"signal": signal.SIGINT}, check=check_resumable),
    Case("sigterm_with_loader_worker", train(*DATA, "data.num_workers=1"), 143,
         r"interrupted in epoch \d+; checkpoints/last\.pt holds epoch", mode="signal",
         extra={"signal": signal.SIGTERM}, check=check_resumable),
    Case("diverging", train("train.lr=1e6", "train.max_bad_steps=2", "train.epochs=4",
         "train.warmup_epochs=0", "train.grad_clip=null"), 1, r"consecutive non-finite steps"),
    Case("log_to_a_file", train(), 0, r"epoch 1/1: loss \d", expect="handled",
         check=check_no_redraws),
    # --- distributed --------------------------------------------------------------------------
    Case("ddp_unreadable_image", voc_train("train.batch_size=4", "train.epochs=2"), 0,
         r"1 unreadable training images were skipped", expect="skip", mode="torchrun",
         setup=with_voc(break_images("train", 1)), check=check_finished, slow=True),
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Running a case, and its verdict
# ---------------------------------------------------------------------------------------------


def run_case(case: Case, ws: Workspace, run: Path) -> Result:
    """Run a prepared case (its setup done) the way its mode says."""
    args = case.command(ws, run)
    if case.mode == "inprocess":
        return run_inprocess(args)
    started = time.perf_counter()
    if case.mode == "subprocess":
        return finish(start(centerx_command(args)), started)
    if case.mode == "signal":
        process = start(centerx_command(args))
        if wait_for(run / "checkpoints" / "last.pt", process):
            time.sleep(0.2)  # into the next epoch
            process.send_signal(case.extra["signal"])
        return finish(process, started)
    if case.mode == "concurrent":
        first = start(centerx_command(args))
        try:
            wait_for(run / "config.yaml", first)  # written once the first run holds the lock
            return run_inprocess(args)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.communicate()
    if case.mode == "mount":
        run.mkdir(parents=True)
        mount = f'mount -t tmpfs -o {case.extra["options"]} tmpfs "$0" && exec "$@"'
        return finish(
            start(["unshare", "-rm", "sh", "-c", mount, str(run), *centerx_command(args)]), started
        )
    if case.mode == "torchrun":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", "-m", "centerx"]  # fmt: skip
        return finish(start([*launcher, *args]), started)
    raise ValueError(f"unknown mode {case.mode!r}")


def unavailable(case: Case) -> str | None:
    """Why a case cannot run on this machine (it is then left out of the counts)."""
    if case.name == "cuda_without_gpu" and torch.cuda.is_available():
        return "a GPU is present"
    if case.mode == "mount" and not unshare_works():
        return "no unprivileged mounts (unshare -rm)"
    return None


def error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("centerx: error:")]


def verdict(case: Case, result: Result, problem: str | None = None) -> tuple[str, str]:
    """(verdict, why) for a finished case; `problem` is what its check or `protect` found."""
    import re

    if result.code is None:
        return "hang", f"still running after {TIMEOUT_S} s"
    if "Traceback (most recent call last)" in result.output:
        return "traceback", result.output.split("Traceback")[1][-300:].strip()
    if problem and case.protect:
        return "loss", problem
    if "HYDRA_FULL_ERROR" in result.output:  # Hydra's own error printing got through
        return "unclear", "Hydra's error printing: " + result.output[-300:]
    errors = error_lines(result)
    if case.expect == "clear":
        if result.code == 0:
            return "silent", "exit 0"
        if result.code != case.code or len(errors) != 1 or not re.search(case.message, errors[0]):
            return "unclear", f"exit {result.code}: {errors or result.stderr[-300:]}"
        return "clear", errors[0]
    if result.code != case.code:
        return "unclear", f"exit {result.code}: {errors or result.stderr[-300:]}"
    found = [line for line in result.output.splitlines() if re.search(case.message, line)]
    if not found:
        return "silent", f"no line matches {case.message!r}"
    if problem:
        return "silent", problem
    return case.expect, found[0][-200:]


@dataclass(frozen=True)
class Outcome:
    verdict: str
    why: str
    result: Result


def try_case(case: Case, ws: Workspace) -> Outcome:
    """Set up, run and judge one case."""
    run = ws.path("runs", case.name)
    if case.setup is not None:
        case.setup(ws, run)
    before = fingerprint(run) if case.protect else None
    result = run_case(case, ws, run)
    problem = None
    if case.protect and fingerprint(run) != before:
        problem = "the earlier run's files changed"
    elif case.check is not None and result.code == case.code:
        problem = case.check(ws, run, result)
    return Outcome(*verdict(case, result, problem), result)


# Cases in their own processes run on background threads, beside the in-process ones (which
# must stay on the main thread: the CLI installs a signal handler).
BACKGROUND_MODES = ("subprocess", "signal", "mount", "torchrun")


def run_all(
    cases: list[Case], ws: Workspace, jobs: int, report: Callable[[Case, Outcome], None]
) -> dict[str, Outcome]:
    """Every case's outcome; `report` is called on the main thread as each one is known."""
    outcomes: dict[str, Outcome] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        background = {
            case.name: pool.submit(try_case, case, ws)
            for case in cases
            if case.mode in BACKGROUND_MODES
        }
        for case in cases:
            if case.name not in background:
                outcomes[case.name] = try_case(case, ws)
                report(case, outcomes[case.name])
        for case in cases:
            if case.name in background:
                outcomes[case.name] = background[case.name].result()
                report(case, outcomes[case.name])
    return outcomes


def print_outcome(case: Case, outcome: Outcome) -> None:
    mark = "ok " if outcome.verdict == case.expect else "BAD"
    print(
        f"{mark} {case.name:32s} {outcome.verdict:9s} {outcome.result.seconds:5.1f}s  "
        f"{outcome.why[:150]}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="case names (default: all)")
    parser.add_argument("--keep", type=Path, help="workspace folder to keep (default: temporary)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument(
        "--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1),
        help="cases in their own processes run this many at a time, beside the in-process ones",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.list:
        for case in CASES:
            print(f"{case.name:32s} {case.expect:8s} exit {case.code}  {case.mode}")
        return 0
    cases = []
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        why_not = unavailable(case)
        if why_not:
            print(f"    {case.name:32s} not run: {why_not}")
        else:
            cases.append(case)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    root = args.keep or Path(tempfile.mkdtemp(prefix="centerx_bad_inputs_"))
    started = time.perf_counter()
    ws = Workspace(root)
    ws.build()
    outcomes = run_all(cases, ws, args.jobs, print_outcome)
    counts = Counter(outcome.verdict for outcome in outcomes.values())
    print(
        f"\n{len(outcomes)} bad inputs and faults tried in {time.perf_counter() - started:.0f} s: "
        + ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts[v])
    )
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(o.verdict == c.expect for c in cases for o in [outcomes[c.name]]) else 1


if __name__ == "__main__":
    run_script(main)
