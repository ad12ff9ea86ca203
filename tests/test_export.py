"""ONNX export: exact peak mask, parity with PyTorch (FP32, FP16, mAP), TensorRT-friendly graph,
the torch-free predictor, the CLI end to end, and clear errors.

Two models: a *spread* model (untrained tiny CenterNet whose heads are rescaled so scores spread
over (0,1): thousands of peaks and many near-ties, the hard case for parity) and a *trained*
one (a few seconds of training on 64 px synthetic shapes, for a non-zero mAP and the CLI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from centerx.data.pipeline import TrainingDataset, build_loader
from centerx.data.synthetic import SyntheticShapes
from centerx.engine.build import checkpoint_meta
from centerx.engine.evaluate import evaluate_predictor, torch_predictor
from centerx.exporter.onnx import ExportError, check_options, export_onnx, export_task
from centerx.exporter.parity import (
    compare_detections,
    compare_fp16,
    compare_peaks,
    torch_reference,
    verify_onnx,
)
from centerx.losses.centernet_loss import CenterNetLoss
from centerx.model.centernet import build_model
from centerx.model.checkpoint import CheckpointError, model_from_checkpoint, save_checkpoint
from centerx.model.decode import peak_mask
from centerx_export import imaging
from centerx_export import predictor as onnx_predictor
from centerx_export.imaging import ImageReadError
from centerx_export.predictor import ModelError, OnnxDetector

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "triangle"]
SIZE = 128  # spread model
TRAIN_SIZE = 64  # trained model

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def model_cfg():
    cfg = OmegaConf.load(REPO / "conf" / "model" / "centernet.yaml")
    cfg.backbone = "tiny"
    return cfg


def letterboxed(source, count: int, size: int) -> np.ndarray:
    batch = [
        imaging.letterbox(source.load_image(i), size)[0].transpose(2, 0, 1) for i in range(count)
    ]
    return np.ascontiguousarray(np.stack(batch))


# ---------------------------------------------------------------------------------------------
# Models and exports (module-scoped: built once)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return letterboxed(SyntheticShapes(6, seed=5, image_size=SIZE), 6, SIZE)


@pytest.fixture(scope="module")
def spread_model(images):
    return make_spread_model(images)


def make_spread_model(images: np.ndarray) -> torch.nn.Module:
    """Untrained tiny model with standardised heads: heatmap logits ~ N(0, 2^2), so scores
    spread over (0,1) with ~1/9 of the cells peaks; wh ~ 6 +- 2 cells, offsets ~ 0.5 +- 0.1
    (inside [0,1): the cell of a detection is floor(box centre / 4))."""
    torch.manual_seed(0)
    model = build_model(model_cfg(), len(CLASSES)).eval()
    with torch.no_grad():
        features = model.features(torch.as_tensor(images))
        for head, std, mean in (
            (model.heads.heatmap, 2.0, 0.0),
            (model.heads.wh, 2.0, 6.0),
            (model.heads.offset, 0.1, 0.5),
        ):
            last = head[-1]
            last.bias.zero_()
            raw = head(features)
            scale = std / raw.std()
            last.weight.mul_(scale)
            last.bias.copy_(mean - raw.mean((0, 2, 3)) * scale)
    return model


@pytest.fixture(scope="module")
def exports(spread_model, tmp_path_factory) -> dict[str, Path]:
    """FP32 detections (static), FP32 heatmap (dynamic H/W), FP16 detections (static), FP32
    heatmap in centerX's layout with float32 input (static)."""
    out = tmp_path_factory.mktemp("exports")
    meta = {"class_names": CLASSES}
    paths = {
        "det32": export_onnx(spread_model, out / "det32.onnx", image_size=SIZE, metadata=meta),
        "heat32": export_onnx(
            spread_model,
            out / "heat32.onnx",
            image_size=SIZE,
            mode="heatmap",
            dynamic_hw=True,
            metadata=meta,
        ),
        "det16": export_onnx(
            spread_model, out / "det16.onnx", image_size=SIZE, fp16=True, metadata=meta
        ),
        "heat_cx": export_onnx(
            spread_model,
            out / "heat_cx.onnx",
            image_size=SIZE,
            mode="heatmap",
            layout="centerx",
            input_dtype="float32",
            metadata=meta,
        ),
    }
    return {key: Path(info["path"]) for key, info in paths.items()}


def train_briefly(steps: int = 30) -> tuple[torch.nn.Module, dict]:
    """A few seconds of training on 64 px shapes: enough for a non-zero mAP."""
    torch.manual_seed(0)
    shapes = {"image_size": TRAIN_SIZE, "max_objects": 3, "size_range": [0.25, 0.5]}
    data = OmegaConf.load(REPO / "conf" / "data" / "synthetic.yaml")
    data.image_size = TRAIN_SIZE
    data.num_workers = 0
    data.train.update(num_images=64, **shapes)
    data.val.update(num_images=48, **shapes)
    cfg = OmegaConf.create({"model": model_cfg(), "data": data})
    source = SyntheticShapes(64, seed=0, **shapes)
    model = build_model(cfg.model, len(CLASSES))
    dataset = TrainingDataset(source, TRAIN_SIZE, augment=None, max_objects=8, seed=0)
    loader = build_loader(dataset, 16, shuffle=True, num_workers=0, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), 5e-3)
    loss = CenterNetLoss()
    step = 0
    while step < steps:
        for batch in loader:
            terms = loss(model(batch["image"]), batch)
            total = terms["cls"] + 0.1 * terms["wh"] + terms["offset"]
            optimizer.zero_grad()
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            step += 1
            if step == steps:
                break
    return model.eval(), checkpoint_meta(cfg, CLASSES)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    model, meta = train_briefly()
    path = tmp_path_factory.mktemp("trained") / "best.pt"
    save_checkpoint(path, {"model": model.state_dict(), "epoch": 1, **meta})
    return path


@pytest.fixture(scope="module")
def run_cli(run_ok):
    """`python -m centerx ARGS` from the repository root, one OpenMP thread; must exit 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return run_ok([sys.executable, "-m", "centerx", *args], timeout, env)

    return run


@pytest.fixture(scope="module")
def cli_export(trained, run_cli, tmp_path_factory) -> Path:
    """`python -m centerx export` of the trained checkpoint (also traced to TorchScript)."""
    run_dir = tmp_path_factory.mktemp("cli") / "export"
    run_cli("export", f"checkpoint={trained}", "torchscript=true", f"hydra.run.dir={run_dir}")
    return run_dir


# ---------------------------------------------------------------------------------------------
# The peak mask: exact, and the centerX trick is not
# ---------------------------------------------------------------------------------------------


def brute_force_peaks(scores: np.ndarray) -> np.ndarray:
    """Keep a value iff it equals the max of its 3x3 neighbourhood (borders: -inf padding)."""
    padded = np.pad(
        scores.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf
    )
    height, width = scores.shape[2:]
    window = np.stack(
        [padded[:, :, dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)]
    )
    return np.where(scores == window.max(0), scores, 0).astype(scores.dtype)


def tricky_scores(dtype) -> np.ndarray:
    """Random scores plus plateaus (2x2 and 1x3 ties at the top), a tie with a bigger
    neighbour, equal values one cell apart, near-ties one ulp apart, and a flat zero area."""
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 16, 16)).astype(dtype)
    for b, c, rows, cols in (
        (0, 0, (1, 5), (1, 5)),
        (0, 1, (4, 7), (4, 9)),
        (0, 2, (7, 10), (7, 12)),
    ):
        x[b, c, rows[0] : rows[1], cols[0] : cols[1]] = 0.05  # quiet surroundings
    x[1, 0, 0:3, 0:4] = 0.1
    x[1, 1, 3:6, 3:7] = 0.05
    x[0, 0, 2:4, 2:4] = 1.0  # plateau: all four are peaks
    x[0, 1, 5, 5:8] = 0.999  # a horizontal plateau of three
    x[0, 2, 8, 8] = x[0, 2, 8, 9] = 0.7
    x[0, 2, 8, 10] = 0.9  # (8,9) ties (8,8) but is beaten by (8,10)
    x[1, 0, 0, 0] = x[1, 0, 0, 2] = 0.99  # equal, two apart: both peaks
    x[1, 1, 4, 4] = 0.5
    x[1, 1, 4, 5] = np.nextafter(dtype(0.5), dtype(1.0))  # one ulp bigger wins
    x[1, 2, 10:16, 10:16] = 0.0  # flat zeros: peaks of value 0 (output 0 either way)
    return x


class PeakMask(torch.nn.Module):
    def forward(self, scores):
        return peak_mask(scores)


class CenterXMask(torch.nn.Module):
    """centerX's peak mask exactly as its exporter writes it (projects/speedup/centerX2onnx.py,
    `centerX_forward`), cast to float included:
    keep = relu((cls - maxpool3x3(cls)).float() + 1e-9) * 1e9; result = cls * keep."""

    def forward(self, cls):
        fmap_max = F.max_pool2d(cls, 3, stride=1, padding=1)
        keep = torch.relu((cls - fmap_max).float() + 1e-9) * 1e9
        return cls * keep


def export_module(
    module: torch.nn.Module, example: torch.Tensor, path: Path, optimize: bool = True
) -> onnx.ModelProto:
    """The DEFAULT exporter, as a user would call it (dynamo; optimize=True unless told), one
    file."""
    torch.onnx.export(module, (example,), str(path), external_data=False, optimize=optimize)
    return onnx.load(str(path))


def run_both(proto: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime CPU and onnx.reference (plain numpy in the graph's own precision)."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    with np.errstate(all="ignore"):
        return session.run(None, {name: x})[0], ReferenceEvaluator(proto).run(None, {name: x})[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_peak_mask_is_exact_in_torch_onnxruntime_and_reference(dtype, tmp_path) -> None:
    x = tricky_scores(dtype)
    expected = brute_force_peaks(x)
    assert expected[0, 0, 2:4, 2:4].min() == 1.0 and (expected[0, 1, 5, 5:8] > 0).all()
    assert expected[0, 2, 8, 9] == 0 and expected[0, 2, 8, 10] == dtype(0.9)
    assert expected[1, 0, 0, 0] > 0 and expected[1, 0, 0, 2] > 0
    assert expected[1, 1, 4, 4] == 0 and expected[1, 1, 4, 5] > 0
    np.testing.assert_array_equal(peak_mask(torch.from_numpy(x)).numpy(), expected)
    proto = export_module(PeakMask(), torch.from_numpy(x), tmp_path / "mask.onnx")
    assert {"Equal", "Where", "MaxPool"} <= {n.op_type for n in proto.graph.node}
    assert (
        onnx.helper.tensor_dtype_to_np_dtype(proto.graph.output[0].type.tensor_type.elem_type)
        == dtype
    )
    runtime, reference = run_both(proto, x)
    np.testing.assert_array_equal(runtime, expected)
    np.testing.assert_array_equal(reference, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_centerx_mask_is_zeroed_by_the_default_exporter(dtype, tmp_path) -> None:
    """centerX's exact mask (with its `.float()` cast) on FP32 and on FP16 scores:
    - eager PyTorch: right (FP16 scores give an FP32 result equal to the exact peak mask);
    - default exporter (torch 2.13 dynamo, optimize=True): the `+ 1e-9` Add is removed from the
      graph, so relu(0) * 1e9 = 0 at every peak: onnxruntime and onnx.reference return zeros;
    - the same exporter with optimize=False keeps the Add, and the exported mask is right.
    (Our Equal/Where mask is exact on the same inputs: the test above.)"""
    x = tricky_scores(dtype)
    expected = brute_force_peaks(x).astype(np.float32)
    assert expected.max() > 0
    eager = CenterXMask()(torch.from_numpy(x)).numpy()
    assert eager.dtype == np.float32
    np.testing.assert_array_equal(eager, expected)

    proto = export_module(CenterXMask(), torch.from_numpy(x), tmp_path / "default.onnx")
    assert "Add" not in {n.op_type for n in proto.graph.node}  # the + 1e-9 is gone
    runtime, reference = run_both(proto, x)
    assert not runtime.any() and not reference.any()  # every score zeroed

    proto = export_module(CenterXMask(), torch.from_numpy(x), tmp_path / "plain.onnx", False)
    assert "Add" in {n.op_type for n in proto.graph.node}
    runtime, reference = run_both(proto, x)
    np.testing.assert_array_equal(runtime, expected)
    np.testing.assert_array_equal(reference, expected)


def test_host_topk_matches_onnx_topk_ties(tmp_path) -> None:
    """The predictor's numpy top-K (heatmap mode) follows ONNX TopK's tie rule exactly."""
    rng = np.random.default_rng(1)
    values = rng.choice(np.float32([0, 0, 0, 0.25, 0.5, 0.5, 0.75, 1.0]), (3, 500))
    values[2] = 0  # fewer than K peaks: fillers are the lowest-index zeros
    values[2, [7, 300]] = 0.5
    k = 40
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=1)],
        "topk",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 500])],
        [
            onnx.helper.make_tensor_value_info("values", onnx.TensorProto.FLOAT, [3, k]),
            onnx.helper.make_tensor_value_info("indices", onnx.TensorProto.INT64, [3, k]),
        ],
        [onnx.numpy_helper.from_array(np.array([k], np.int64), "k")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 9
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    expected_values, expected_index = session.run(None, {"x": values})
    got_values, got_index = onnx_predictor.topk_rows(values, k)
    np.testing.assert_array_equal(got_values, expected_values)
    np.testing.assert_array_equal(got_index, expected_index)


# ---------------------------------------------------------------------------------------------
# The exported graph
# ---------------------------------------------------------------------------------------------


def test_graph_is_one_checked_file_that_tensorrt_8_and_10_accept(exports) -> None:
    for key, path in exports.items():
        assert [p.name for p in path.parent.iterdir() if p.name.startswith(path.stem)] == [
            path.name
        ]
        proto = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(proto, full_check=True)
        assert all(
            i.data_location == onnx.TensorProto.DEFAULT and not i.external_data
            for i in proto.graph.initializer
        ), key
        assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
        ops = {n.op_type for n in proto.graph.node}
        assert "Mod" not in ops, key  # TensorRT 8 has no Mod
        assert {"MaxPool", "Equal", "Where"} <= ops, key
        initializers = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
        topk = [n for n in proto.graph.node if n.op_type == "TopK"]
        assert len(topk) == (0 if key.startswith("heat") else 1)
        for node in topk:  # K must be a constant initializer (TensorRT)
            assert initializers[node.input[1]].tolist() == [100]
        meta = {p.key: p.value for p in proto.metadata_props}
        assert json.loads(meta["class_names"]) == CLASSES
        assert meta["mode"] == ("heatmap" if key.startswith("heat") else "detections")
        assert any(n.name.startswith("postprocess/") for n in proto.graph.node)
    fp16 = onnx.load(str(exports["det16"]))
    weights = {i.name: i.data_type for i in fp16.graph.initializer}
    convs = [n for n in fp16.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert len(convs) > 10
    assert {weights[n.input[1]] for n in convs} == {onnx.TensorProto.FLOAT16}


def test_fp32_parity_both_modes(spread_model, exports, images) -> None:
    reference, reference_peaks = torch_reference(spread_model, images)
    assert (reference_peaks > 0).sum() > 1000  # many peaks: a real test of the mask
    det = OnnxDetector(exports["det32"])
    heat = OnnxDetector(exports["heat32"])
    graph_dets = det.predict_letterboxed(images)
    raw = heat.run(images)
    host_dets = heat.decode(raw)
    for dets in (graph_dets, host_dets):
        figures = compare_detections(reference, dets, band=1e-5)
        assert figures["matched"] >= 0.99 * len(images) * 100, figures
        assert figures["missing"] == figures["extra"] == 0, figures
        assert figures["max_box_rel"] <= 1e-4 and figures["max_score_rel"] <= 1e-4, figures
    peaks = compare_peaks(reference_peaks, raw["heatmap"])
    assert peaks["mismatched_cells"] == 0 and peaks["max_score_rel"] <= 1e-4, peaks
    # Host-side top-K of the heatmap mode == the in-graph top-K of the detections mode.
    np.testing.assert_array_equal(host_dets[2], graph_dets[2])
    np.testing.assert_allclose(host_dets[1], graph_dets[1], rtol=1e-6, atol=0)
    np.testing.assert_allclose(host_dets[0], graph_dets[0], rtol=1e-5, atol=1e-5)


def test_centerx_layout_feeds_centerx_host_code(spread_model, exports, images) -> None:
    """layout=centerx orders the heatmap-mode outputs (heatmap, offset, wh), as centerX's host
    code (projects/speedup/onnx_inference.py) unpacks them by position: (cls, reg, wh). Its
    decode (threshold every cell, no top-K; box = (cell + reg -+ wh/2) * 4), written here from
    that description and fed float32 like centerX, finds the detections of our in-graph decode
    above the threshold (PyTorch's, with a K large enough to cut none); our predictor decodes
    the file by name."""
    session = ort.InferenceSession(str(exports["heat_cx"]), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["heatmap", "offset", "wh"]
    assert session.get_inputs()[0].type == "tensor(float)"
    cls, reg, wh = session.run(None, {"images": images.astype(np.float32)})
    threshold = 0.7
    boxes, scores, classes = [], [], []
    for b in range(len(images)):
        c, ys, xs = np.nonzero(cls[b] >= threshold)
        cx, cy = xs + reg[b, 0, ys, xs], ys + reg[b, 1, ys, xs]
        w, h = wh[b, 0, ys, xs], wh[b, 1, ys, xs]
        boxes.append(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1) * 4)
        scores.append(cls[b][c, ys, xs])
        classes.append(c)
    count = max(len(s) for s in scores)
    host = tuple(
        np.stack([np.pad(a, [(0, count - len(a))] + [(0, 0)] * (a.ndim - 1)) for a in arrays])
        for arrays in (boxes, scores, classes)
    )
    reference, _ = torch_reference(spread_model, images, top_k=2000)
    assert (reference[1] >= threshold).sum(1).max() < 2000
    figures = compare_detections(reference, host, score_threshold=threshold, band=1e-5)
    assert figures["reference"] > 300 and figures["missing"] == figures["extra"] == 0, figures
    assert figures["max_box_rel"] <= 1e-4 and figures["max_score_rel"] <= 1e-4, figures
    graph = OnnxDetector(exports["det32"]).predict_letterboxed(images)
    by_name = OnnxDetector(exports["heat_cx"]).predict_letterboxed(images)
    np.testing.assert_array_equal(by_name[2], graph[2])
    np.testing.assert_allclose(by_name[0], graph[0], rtol=1e-5, atol=1e-5)


def test_dynamic_batch_and_dynamic_height_width(spread_model, exports, images) -> None:
    det = OnnxDetector(exports["det32"])
    full = det.predict_letterboxed(images[:3])
    for start, stop in ((0, 1), (1, 3)):
        part = det.predict_letterboxed(images[start:stop])
        assert part[0].shape == (stop - start, 100, 4)
        figures = compare_detections(tuple(a[start:stop] for a in full), part, band=1e-5)
        assert figures["missing"] == figures["extra"] == 0, figures
        assert figures["max_box_rel"] <= 1e-4 and figures["max_score_rel"] <= 1e-4, figures
    with pytest.raises(ValueError, match="differs from the exported 128"):
        det.predict_letterboxed(images[:, :, :96])
    heat = OnnxDetector(exports["heat32"])
    rng = np.random.default_rng(0)
    for shape in ((1, 3, 96, 160), (3, 3, 64, 64)):
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        _, reference_peaks = torch_reference(spread_model, x)
        got = heat.run(x)
        assert got["heatmap"].shape == (shape[0], 3, shape[2] // 4, shape[3] // 4)
        peaks = compare_peaks(reference_peaks, got["heatmap"])
        assert peaks["mismatched_cells"] == 0 and peaks["max_score_rel"] <= 1e-4, peaks
    with pytest.raises(ValueError, match="not a multiple of 32"):
        heat.run(rng.integers(0, 256, (1, 3, 100, 128), dtype=np.uint8))


class GatherElements(OpRun):
    """onnx.reference's GatherElements uses np.choose (at most 64 choices); same semantics."""

    op_domain = ""

    def _run(self, data, indices, axis=None):
        return (np.take_along_axis(data, indices, axis=axis),)


def test_fp16_parity_in_onnxruntime_and_reference(spread_model, exports, images) -> None:
    threshold = 0.7  # cuts the spread model's top-100 lists in the middle
    result = verify_onnx(spread_model, exports["det16"], images, score_threshold=threshold)
    dets = result["detections_above_threshold"]
    assert result["precision"] == "fp16" and result["passed"], result
    assert dets["reference"] > 100 and dets["missing"] == dets["extra"] == 0, dets
    assert dets["max_score_abs"] <= 1e-2, dets
    assert dets["near_tie_flips"] <= 0.02 * dets["reference"], dets
    # onnxruntime CPU upcasts many FP16 ops to FP32, which would hide an FP16 overflow:
    # onnx.reference computes every FP16 node in numpy FP16. Check all intermediate values
    # are finite, and the detections above the threshold still match PyTorch FP32.
    proto = onnx.load(str(exports["det16"]))
    names = [o for n in proto.graph.node for o in n.output if o]
    evaluator = ReferenceEvaluator(proto, new_ops=[GatherElements])
    reference, _, scores = torch_reference(spread_model, images[:1], scores=True)
    with np.errstate(over="raise", invalid="raise"):
        values = evaluator.run(names, {"images": images[:1]})
    by_name = dict(zip(names, values, strict=True))
    half = [v for v in values if isinstance(v, np.ndarray) and v.dtype == np.float16]
    assert len(half) > 20 and all(np.isfinite(v).all() for v in half)
    got = tuple(by_name[o.name] for o in proto.graph.output)
    figures = compare_fp16(reference, got, threshold, scores)
    # True FP16 arithmetic end to end (unlike onnxruntime above, which is held to the exact
    # set match): a score within FP16 rounding of the threshold may cross it either way, so
    # here a few detections may appear or vanish at the cut; the scores that match must agree.
    assert figures["reference"] > 20, figures
    assert figures["matched"] >= 0.95 * figures["reference"], figures
    assert figures["missing"] + figures["extra"] <= max(2, 0.05 * figures["reference"]), figures
    assert figures["max_score_abs"] <= 1e-2, figures


# ---------------------------------------------------------------------------------------------
# mAP parity and the CLI (trained model)
# ---------------------------------------------------------------------------------------------


def test_map_parity_on_synthetic_validation(trained, cli_export, run_cli) -> None:
    model, _ = model_from_checkpoint(trained)
    val = SyntheticShapes(48, seed=1, image_size=TRAIN_SIZE, max_objects=3, size_range=(0.25, 0.5))
    torch_metrics = evaluate_predictor(torch_predictor(model), val, TRAIN_SIZE, progress=False)
    detector = OnnxDetector(cli_export / "model.onnx")
    onnx_metrics = evaluate_predictor(detector.predict_letterboxed, val, TRAIN_SIZE, progress=False)
    assert torch_metrics["AP50"] > 0.01, torch_metrics  # a model that finds something
    assert torch_metrics["num_detections"] == onnx_metrics["num_detections"]
    for key in ("AP", "AP50", "AP75"):
        assert round(torch_metrics[key], 3) == round(onnx_metrics[key], 3), key
    # The CLI evaluator on the ONNX file reports the same numbers.
    run_dir = cli_export.parent / "eval"
    run_cli("eval", f"checkpoint={cli_export / 'model.onnx'}", f"hydra.run.dir={run_dir}")
    cli_metrics = json.loads((run_dir / "eval.json").read_text())
    for key in ("AP", "AP50"):
        assert round(cli_metrics[key], 3) == round(torch_metrics[key], 3), key


def test_cli_export_writes_model_and_parity_report(cli_export, trained) -> None:
    report = json.loads((cli_export / "export.json").read_text())
    assert report["onnx"]["opset"] == 17 and report["onnx"]["topk_k"] == [[100]]
    parity = report["parity"]
    assert parity["passed"] and parity["precision"] == "fp32", parity
    assert parity["inputs"].startswith("validation data")
    assert parity["detections_top_k"]["missing"] == 0
    assert parity["detections_top_k"]["max_score_rel"] <= 1e-4
    assert report["torchscript"]["parity"]["passed"], report["torchscript"]
    detector = OnnxDetector(cli_export / "model.onnx")
    assert detector.class_names == CLASSES and detector.image_size == TRAIN_SIZE
    assert detector.metadata["config"]["data"]["val"]["num_images"] == 48
    assert detector.metadata["input_dtype"] == "uint8" and detector.metadata["stride"] == 32


def write_video(path: Path, frames: int, fps: float = 10.0) -> None:
    """A short mp4v video of synthetic shapes, 96x64 (written with OpenCV, as a camera would)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (96, 64))
    assert writer.isOpened()
    for index in range(frames):
        image = SyntheticShapes(1, seed=20 + index, image_size=96).load_image(0)
        writer.write(cv2.resize(image, (96, 64))[:, :, ::-1].copy())
    writer.release()


def count_frames(path: Path) -> int:
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened(), path
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


def keys_of(value) -> object:
    """The shape of a JSON value: its keys, recursively (lists by their first element)."""
    if isinstance(value, dict):
        return {key: keys_of(item) for key, item in value.items()}
    if isinstance(value, list) and value:
        return [keys_of(value[0])]
    return type(value).__name__ if value is not None else None


def test_cli_predict_images_and_video_one_schema_for_both_models(
    trained, cli_export, run_cli, tmp_path
) -> None:
    """`python -m centerx predict` on a folder (two images, an unreadable file, a video) with
    the PyTorch checkpoint and with its ONNX export: the same predictions.json schema, the
    same detections, an annotated video and one JSON record per frame."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    sizes = []
    for index in range(2):
        image = SyntheticShapes(2, seed=9, image_size=96).load_image(index)[:, 16:]
        sizes.append(image.shape[:2])
        cv2.imwrite(str(folder / f"img{index}.jpg"), image[:, :, ::-1])  # BGR on disk
    (folder / "broken.png").write_bytes(b"not an image")
    video = folder / "clip.mp4"
    write_video(video, frames=5)
    summaries = {}
    for name, model in (("pytorch", trained), ("onnx", cli_export / "model.onnx")):
        run_dir = tmp_path / name
        run_cli(
            "predict",
            f"checkpoint={model}",
            f"input={folder}",
            "score_threshold=0.05",
            f"hydra.run.dir={run_dir}",
        )
        summary = json.loads((run_dir / "predictions.json").read_text())
        assert summary["format"] == "centerx-predictions/1" and summary["model"] == str(model)
        assert summary["class_names"] == CLASSES and summary["image_size"] == TRAIN_SIZE
        stills = [r for r in summary["images"] if "frame" not in r]
        assert [Path(r["image"]).name for r in stills] == ["img0.jpg", "img1.jpg"]
        assert [Path(s["image"]).name for s in summary["skipped"]] == ["broken.png"]
        assert "not a decodable image" in summary["skipped"][0]["error"]
        assert (run_dir / "img0_pred.png").is_file()
        for item, (height, width) in zip(stills, sizes, strict=True):
            assert (item["height"], item["width"]) == (height, width)
        frames = [r for r in summary["images"] if "frame" in r]
        assert [(r["frame"], r["timestamp"]) for r in frames] == [
            (i, round(i / 10, 3)) for i in range(5)
        ]
        assert {(r["image"], r["width"], r["height"]) for r in frames} == {(str(video), 96, 64)}
        assert summary["videos"] == [
            {
                "video": str(video),
                "output": str(run_dir / "clip_pred.mp4"),
                "frames": 5,
                "fps": 10.0,
                "width": 96,
                "height": 64,
            }
        ]
        assert count_frames(run_dir / "clip_pred.mp4") == 5
        for item in summary["images"]:
            for det in item["detections"]:
                x0, y0, x1, y1 = det["box"]
                assert 0 <= x0 <= x1 <= item["width"] and 0 <= y0 <= y1 <= item["height"]
                assert det["score"] >= 0.05 and CLASSES[det["class_id"]] == det["class"]
        summaries[name] = summary
    torch_run, onnx_run = summaries["pytorch"], summaries["onnx"]
    assert keys_of(torch_run) == keys_of(onnx_run)
    assert sum(len(r["detections"]) for r in torch_run["images"]) > 0
    for ours, theirs in zip(torch_run["images"], onnx_run["images"], strict=True):
        # FP32 parity: the same detections, except right at the threshold.
        confident = [
            [d for d in record["detections"] if d["score"] >= 0.06] for record in (ours, theirs)
        ]
        assert len(confident[0]) == len(confident[1]), (ours, theirs)
        for a, b in zip(*confident, strict=True):
            assert a["class"] == b["class"] and abs(a["score"] - b["score"]) <= 2e-4
            assert np.abs(np.subtract(a["box"], b["box"])).max() <= 0.02


def test_predict_with_nothing_readable_exits_1(trained, cli_export, tmp_path) -> None:
    """No readable input: predictions.json lists the skipped files and the command fails."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    command = [sys.executable, "-m", "centerx", "predict", f"checkpoint={trained}"]
    command += [f"input={broken}", f"hydra.run.dir={tmp_path / 'run'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no input could be read: cannot read image" in done.stdout + done.stderr
    summary = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert summary["images"] == [] and len(summary["skipped"]) == 1
    junk_video = tmp_path / "junk.mp4"
    junk_video.write_bytes(b"not a video")
    model = OnnxDetector(cli_export / "model.onnx").as_model()
    with pytest.raises(onnx_predictor.NoReadableInputError, match=r"cannot open video .*junk"):
        onnx_predictor.predict_files(model, junk_video, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        onnx_predictor.predict_files(model, tmp_path / "missing.mp4", tmp_path / "out")


def loaded_modules(code: str) -> list[str]:
    """sys.modules after running `code` in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_dependencies_run_one_way() -> None:
    """The kit imports no torch and nothing from centerx (onnxruntime only when a session is
    built); centerx's core never imports the exporter, an ONNX module or onnxruntime."""
    kit = loaded_modules("import centerx_export.predictor, centerx_export.tensorrt")
    assert {"centerx_export.predictor", "centerx_export.tensorrt", "cv2"} <= set(kit)
    assert [m for m in kit if m.split(".")[0] in ("torch", "centerx", "onnxruntime")] == []
    core = loaded_modules(
        "import centerx, centerx.engine.evaluate, centerx.engine.trainer, centerx.data.pipeline"
    )
    assert {"torch", "centerx.engine.trainer", "centerx_export.imaging"} <= set(core)
    forbidden = ("centerx.exporter", "centerx_export.onnx", "onnxruntime", "onnx")
    assert [m for m in core if m.split(".")[0] in forbidden or m.startswith(forbidden)] == []


def test_predictor_runs_without_torch(cli_export, tmp_path) -> None:
    """The deployment kit's files alone, in a process where torch never loads: images and a
    video."""
    kit = tmp_path / "kit"
    kit.mkdir()
    for name in ("predictor.py", "imaging.py"):
        shutil.copy(REPO / "export" / name, kit / name)
    shutil.copy(cli_export / "model.onnx", kit / "model.onnx")
    image = SyntheticShapes(1, seed=3, image_size=64).load_image(0)
    cv2.imwrite(str(kit / "image.png"), image[:, :, ::-1])
    write_video(kit / "clip.avi", frames=3)
    code = (
        "import sys, imaging, predictor\n"
        "detector = predictor.OnnxDetector('model.onnx')\n"
        "boxes, scores, classes = detector.predict(imaging.read_image('image.png'), 0.0)\n"
        "assert len(scores) == 100 and boxes.shape == (100, 4)\n"
        "args = ['--model', 'model.onnx', '--input', 'image.png', 'clip.avi', '--out', 'o']\n"
        "assert predictor.main(args) == 0\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'centerx'))\n"
        "print('LOADED', loaded)\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=kit, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "LOADED []" in done.stdout
    summary = json.loads((kit / "o" / "predictions.json").read_text())
    assert [r.get("frame") for r in summary["images"]] == [None, 0, 1, 2]  # in input order
    assert (kit / "o" / "image_pred.png").is_file() and count_frames(
        kit / "o" / "clip_pred.avi"
    ) == 3


def test_one_implementation_of_letterbox_reading_and_drawing(exports, spread_model) -> None:
    """centerx imports the kit's geometry, image reader and drawing (the kit is the bottom
    layer), so the deployed predictor and the PyTorch predict path give the same detections."""
    from centerx.data import base, transforms
    from centerx.engine import evaluate
    from centerx.engine.predict import predict_image
    from centerx.utils import visualize

    shared = ("letterbox_matrix", "warp_image", "transform_boxes", "invert_affine", "affine_matrix")
    assert all(getattr(transforms, name) is getattr(imaging, name) for name in shared)
    assert evaluate.to_original is imaging.to_original
    assert base.read_image is imaging.read_image and base.ImageReadError is ImageReadError
    assert visualize.class_color is imaging.class_color and visualize.save_rgb is imaging.save_rgb
    image = SyntheticShapes(1, seed=4, image_size=160).load_image(0)[:, 30:]
    detector = OnnxDetector(exports["det32"])
    got = detector.predict(image, score_threshold=0.5)
    expected = predict_image(torch_predictor(spread_model), image, SIZE, 0.5)
    assert len(got[1]) > 10
    np.testing.assert_array_equal(got[2], expected[2])
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(tmp_path, exports) -> None:
    cfg = OmegaConf.load(REPO / "conf" / "export.yaml")
    cfg.out_dir = str(tmp_path / "out")
    cfg.checkpoint = str(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*missing\.pt"):
        export_task(cfg)
    cfg.checkpoint = None
    with pytest.raises(ExportError, match="checkpoint=PATH"):
        export_task(cfg)
    cfg.checkpoint = str(tmp_path / "missing.pt")
    cfg.image_size = 100
    with pytest.raises(
        ExportError, match=r"image_size height 100 is not a positive multiple of 32.*96"
    ):
        export_task(cfg)
    cfg.image_size, cfg.mode = None, "boxes"
    with pytest.raises(
        ExportError, match=r"unknown export mode 'boxes'.*mode=detections or mode=heatmap"
    ):
        export_task(cfg)
    with pytest.raises(ExportError, match="input_dtype"):
        check_options("detections", "float16", 128, 100, 17)
    with pytest.raises(ExportError, match="opset"):
        check_options("detections", "uint8", 128, 100, 11)
    with pytest.raises(ExportError, match="layout=centerx orders the outputs of mode=heatmap"):
        check_options("detections", "uint8", 128, 100, 17, layout="centerx")
    with pytest.raises(ExportError, match="unknown layout 'centerX'"):
        check_options("heatmap", "uint8", 128, 100, 17, layout="centerX")
    # The predictor
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\x00" * 64)
    with pytest.raises(ImageReadError, match=r"cannot read image .*broken\.jpg: not a decodable"):
        imaging.read_image(broken)
    with pytest.raises(ImageReadError, match="file is empty"):
        (tmp_path / "empty.png").write_bytes(b"")
        imaging.read_image(tmp_path / "empty.png")
    with pytest.raises(ImageReadError, match="No such file"):
        imaging.read_image(tmp_path / "nope.png")
    with pytest.raises(ModelError, match="ONNX model not found"):
        OnnxDetector(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ModelError, match="cannot load ONNX model"):
        OnnxDetector(tmp_path / "junk.onnx")
    detector = OnnxDetector(exports["det32"])
    with pytest.raises(ValueError, match="expected an RGB uint8 image HxWx3"):
        detector.predict(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match=r"expected RGB images as an array \[B,3,H,W\]"):
        detector.predict_letterboxed(np.zeros((1, 128, 128, 3), np.uint8))
    assert (
        onnx_predictor.main(
            ["--model", str(exports["det32"]), "--input", str(broken), "--out", str(tmp_path / "o")]
        )
        == 1
    )
    assert (
        onnx_predictor.main(["--model", str(tmp_path / "nope.onnx"), "--input", str(broken)]) == 1
    )


# ---------------------------------------------------------------------------------------------
# TensorRT (needs an NVIDIA GPU with TensorRT: skipped elsewhere, with the reason)
# ---------------------------------------------------------------------------------------------


def test_tensorrt_engine_matches_onnxruntime(exports, images, tmp_path) -> None:
    from centerx_export import tensorrt as trt_kit

    reason = trt_kit.unavailable_reason()
    if reason:
        pytest.skip(f"TensorRT path not tested here: {reason}")
    reference = OnnxDetector(exports["det32"]).predict_letterboxed(images[:2])
    for precision in ("fp32", "fp16"):
        engine = trt_kit.build_engine(
            exports["det32"], tmp_path / f"model_{precision}.engine", precision=precision
        )
        runner = trt_kit.TensorRTDetector(engine, exports["det32"])
        got = runner.predict_letterboxed(images[:2])
        tolerance = {"fp32": (1e-3, 0.5), "fp16": (1e-2, 2.0)}[precision]
        figures = compare_detections(
            reference, got, score_threshold=0.3, band=tolerance[0], match_px=tolerance[1]
        )
        assert figures["missing"] == figures["extra"] == 0, (precision, figures)
        assert figures["max_score_abs"] <= tolerance[0], (precision, figures)


def test_tensorrt_build_command_and_clear_errors(exports, tmp_path, monkeypatch) -> None:
    """What runs without a GPU: the trtexec command line, and the errors."""
    from centerx_export import tensorrt as trt_kit

    fake = tmp_path / "trtexec"
    fake.write_text("#!/bin/sh\necho 'fake trtexec: cannot build' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("TRTEXEC", str(fake))
    meta = trt_kit.read_onnx_metadata(exports["det32"])
    command = trt_kit.trtexec_command(exports["det32"], tmp_path / "m.engine", meta, "fp16", 8)
    assert command[0] == str(fake) and "--fp16" in command
    assert f"--minShapes=images:1x3x{SIZE}x{SIZE}" in command
    assert f"--maxShapes=images:8x3x{SIZE}x{SIZE}" in command
    assert "--precisionConstraints=obey" in command
    pinned = next(c for c in command if c.startswith("--layerPrecisions="))
    names = {n.name for n in onnx.load(str(exports["det32"])).graph.node}
    layers = [item.rsplit(":", 1) for item in pinned.split("=", 1)[1].split(",")]
    assert {"MaxPool", "Equal", "Where", "TopK"} <= {
        name.split("/")[1].split("_")[0] for name, _ in layers
    }
    assert all(name in names and precision == "fp32" for name, precision in layers)
    dynamic = trt_kit.read_onnx_metadata(exports["heat32"])
    command = trt_kit.trtexec_command(exports["heat32"], tmp_path / "h.engine", dynamic, "fp32", 4)
    assert "--minShapes=images:1x3x32x32" in command and "--maxShapes=images:4x3x128x128" in command
    fp16 = trt_kit.read_onnx_metadata(exports["det16"])
    with pytest.raises(trt_kit.TensorRTError, match=r"already FP16.*precision=typed"):
        trt_kit.trtexec_command(exports["det16"], tmp_path / "x.engine", fp16, "fp16")
    assert "--stronglyTyped" in trt_kit.trtexec_command(
        exports["det16"], tmp_path / "x.engine", fp16, "typed"
    )
    with pytest.raises(trt_kit.TensorRTError, match=r"(?s)trtexec failed \(3\).*cannot build"):
        trt_kit.build_engine(exports["det32"], tmp_path / "m.engine", "fp32")
    if trt_kit.unavailable_reason():
        with pytest.raises(trt_kit.TensorRTError, match="cannot run TensorRT here"):
            trt_kit.TensorRTDetector(tmp_path / "m.engine", exports["det32"])
    monkeypatch.setenv("TRTEXEC", str(tmp_path / "missing"))
    monkeypatch.setenv("PATH", str(tmp_path))
    if trt_kit.find_trtexec() is None:
        with pytest.raises(trt_kit.TensorRTError, match="trtexec not found"):
            trt_kit.trtexec_command(exports["det32"], tmp_path / "m.engine", meta)
