"""Checkpoint -> ONNX with the post-processing in the graph (`run.sh export checkpoint=PATH`).

The exported graph takes RGB images 0..255 (uint8 or float32) [B,3,H,W] and normalises inside.
Two output modes, both built from `centerx.model.decode` (one implementation of the peak mask
and of the decode, shared with the PyTorch evaluator):

- `detections`: boxes [B,K,4] (input pixels, xyxy), scores [B,K], classes [B,K] (int64):
  sigmoid, exact 3x3 peak mask, TopK with a constant K, index split and gathers in the graph.
- `heatmap`: the peak-masked class probabilities [B,C,H/4,W/4] (non-peaks are exactly 0), wh
  and offset [B,2,H/4,W/4] (output-grid units), ordered (heatmap, wh, offset); with
  `layout=centerx` ordered (heatmap, offset, wh), the order centerX's host code unpacks
  (cls, reg, wh). export/README.md lists what else differs from centerX's pre-processing.

Exporter: torch.onnx.export with the default dynamo exporter (torch.export + onnxscript), at
opset 17 (the exporter emits 18 and converts down; 17 is what TensorRT 8.5/8.6 parse, and
TensorRT 10 reads it too). Then onnxslim, onnx.checker, one self-contained file
(external_data=False). Why each choice is safe for TensorRT 8 and 10 is in export/README.md.
The deployment kit (`centerx_export`) runs the result; this package is the only part that
needs torch.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from centerx.engine import run_directory
from centerx.engine.build import build_sources, run_dir
from centerx.errors import UsageError
from centerx.exporter.parity import verify_onnx, verify_torchscript
from centerx.model.checkpoint import model_from_checkpoint
from centerx.model.decode import decode, peak_mask
from centerx_export.imaging import letterbox

log = logging.getLogger(__name__)

OPSET = 17
MODES = ("detections", "heatmap")
INPUT_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}
INPUT_MULTIPLE = 32  # the backbone stride: input height and width must be multiples of it
# Output names, in graph order, by (mode, layout). `centerx` orders the heatmap-mode outputs as
# centerX's host code unpacks them (cls, reg, wh); names always say what each output holds.
OUTPUT_NAMES = {
    ("detections", "standard"): ["boxes", "scores", "classes"],
    ("heatmap", "standard"): ["heatmap", "wh", "offset"],
    ("heatmap", "centerx"): ["heatmap", "offset", "wh"],
}
LAYOUTS = ("standard", "centerx")
POSTPROCESS_PREFIX = "postprocess/"
METADATA_FORMAT = 1
FLOAT_INDEX_LIMIT = 2**24  # the exporter splits flat indices with float Div+Floor: exact below this


class ExportError(UsageError):
    """An export option or input is invalid (unknown mode, bad size, ...)."""


# ---------------------------------------------------------------------------------------------
# The exported module
# ---------------------------------------------------------------------------------------------


def _cast_to_own_dtype(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: floating inputs take the dtype of the module's own weights."""
    own = next(
        t
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
        if t.is_floating_point()
    )
    return tuple(
        a.to(own.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args
    )


def half_precision(model: nn.Module) -> nn.Module:
    """A copy of a CenterNet whose layers run in FP16 while the input normalisation stays FP32.

    Every module holding weights casts its floating inputs to its own dtype, so the model's
    forward (whatever its stages and skips) runs unchanged: no copy of its code to drift."""
    half = copy.deepcopy(model).half()
    for name in ("input_mean", "input_std"):
        if hasattr(half, name):
            setattr(half, name, getattr(half, name).float())
    for module in half.modules():
        if module is half:
            continue
        own = [
            t
            for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
            if t.is_floating_point()
        ]
        if own:
            module.register_forward_pre_hook(_cast_to_own_dtype)
    return half


class ExportWrapper(nn.Module):
    """CenterNet + post-processing, the module that is exported.

    FP16 runs the network in half precision and the post-processing in FP32 (heads cast up
    before the sigmoid): outputs keep one dtype for both precisions, boxes keep FP32 accuracy,
    and the peak mask is exact in either precision anyway (tests/test_export.py)."""

    def __init__(
        self,
        model: nn.Module,
        mode: str = "detections",
        top_k: int = 100,
        fp16: bool = False,
        layout: str = "standard",
    ) -> None:
        super().__init__()
        self.output_names = output_names(mode, layout)
        self.model = half_precision(model) if fp16 else model
        self.mode, self.top_k, self.fp16 = mode, int(top_k), fp16
        self.stride = int(getattr(model, "stride", 4))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(images)
        heatmap = outputs["heatmap"].float().sigmoid()
        wh, offset = outputs["wh"].float(), outputs["offset"].float()
        if self.mode == "detections":
            return decode(heatmap, wh, offset, k=self.top_k, stride=self.stride)
        by_name = {"heatmap": peak_mask(heatmap), "wh": wh, "offset": offset}
        return tuple(by_name[name] for name in self.output_names)


# ---------------------------------------------------------------------------------------------
# ONNX export
# ---------------------------------------------------------------------------------------------


def output_names(mode: str, layout: str = "standard") -> list[str]:
    """The graph's output names in order; ExportError for an unknown mode or layout."""
    if mode not in MODES:
        raise ExportError(f"unknown export mode {mode!r}; choose mode=detections or mode=heatmap")
    if layout not in LAYOUTS:
        raise ExportError(f"unknown layout {layout!r}; choose layout=standard or layout=centerx")
    if (mode, layout) not in OUTPUT_NAMES:
        raise ExportError(
            f"layout={layout} orders the outputs of mode=heatmap; use it with mode=heatmap"
        )
    return OUTPUT_NAMES[mode, layout]


def check_options(
    mode: str,
    input_dtype: str,
    image_size: int | tuple[int, int],
    top_k: int,
    opset: int,
    layout: str = "standard",
) -> tuple[int, int]:
    """Validate export options with messages that say what to change; returns (height, width)."""
    output_names(mode, layout)
    if input_dtype not in INPUT_DTYPES:
        raise ExportError(
            f"unknown input_dtype {input_dtype!r}; choose input_dtype=uint8 or input_dtype=float32"
        )
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    for name, value in (("height", height), ("width", width)):
        if int(value) != value or value <= 0 or value % INPUT_MULTIPLE:
            raise ExportError(
                f"image_size {name} {value} is not a positive multiple of {INPUT_MULTIPLE} "
                f"(the backbone stride); use e.g. {max(1, round(value / INPUT_MULTIPLE)) * INPUT_MULTIPLE}"
            )
    if int(top_k) < 1:
        raise ExportError(f"top_k must be >= 1, got {top_k}")
    if int(opset) < 17:
        raise ExportError(
            f"opset {opset} is not supported: the exporter cannot go below 17 (use opset=17)"
        )
    return int(height), int(width)


def _tag_postprocess(proto: onnx.ModelProto) -> int:
    """Name every node downstream of the heatmap sigmoid `postprocess/...`: the part a TensorRT
    FP16 build must keep in FP32 (tensorrt.py passes these names to --layerPrecisions)."""
    nodes = list(proto.graph.node)
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    frontier = [i for i, n in enumerate(nodes) if n.op_type == "Sigmoid"]
    seen: set[int] = set()
    while frontier:
        i = frontier.pop()
        if i in seen:
            continue
        seen.add(i)
        for out in nodes[i].output:
            frontier.extend(consumers.get(out, []))
    for i in sorted(seen):
        nodes[i].name = f"{POSTPROCESS_PREFIX}{nodes[i].op_type}_{i}"
    return len(seen)


def graph_summary(proto: onnx.ModelProto) -> dict:
    """Op counts, inputs/outputs (shape and dtype), opset, and the TopK K values."""

    def spec(value: onnx.ValueInfoProto) -> dict:
        tensor = value.type.tensor_type
        return {
            "name": value.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
            "shape": [d.dim_param or d.dim_value for d in tensor.shape.dim],
        }

    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    topk = [
        initializers[n.input[1]].ravel().tolist() if n.input[1] in initializers else "dynamic"
        for n in proto.graph.node
        if n.op_type == "TopK"
    ]
    return {
        "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "ir_version": proto.ir_version,
        "inputs": [spec(v) for v in proto.graph.input],
        "outputs": [spec(v) for v in proto.graph.output],
        "ops": dict(sorted(Counter(n.op_type for n in proto.graph.node).items())),
        "topk_k": topk,
    }


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints progress and warnings; keep the run log readable."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        loggers = [
            logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")
        ]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _dynamic_sizes(
    num_classes: int, top_k: int, height: int, width: int, dynamic_hw: bool
) -> tuple[int, int]:
    """(min, max) input side in multiples of 32 that the graph accepts; (1, 1) when static.

    The float index split of the top-K decode is exact while (C+1) * H/4 * W/4 <= 2^24; with
    dynamic H/W, K is still a constant, so the smallest input must hold top_k cells."""
    if not dynamic_hw:
        if (num_classes + 1) * (height // 4) * (width // 4) > FLOAT_INDEX_LIMIT:
            raise ExportError(
                f"{num_classes} classes at {height}x{width} exceed the exact index range of the "
                "exported top-K decode (2^24 cells); export a smaller image_size"
            )
        return 1, 1
    min_side = max(1, math.ceil(math.sqrt(top_k / (64 * num_classes))))
    max_side = min(256, math.floor(math.sqrt(FLOAT_INDEX_LIMIT / (num_classes + 1)) / 8))
    if max_side < max(min_side, height // INPUT_MULTIPLE, width // INPUT_MULTIPLE):
        raise ExportError(f"{num_classes} classes leave no valid dynamic size range")
    return min_side, max_side


def _trace_to_onnx(
    wrapper: ExportWrapper,
    example: torch.Tensor,
    sides: tuple[int, int] | None,
    opset: int,
    slim: bool,
) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) with a dynamic batch (and H/W between `sides` x 32), then
    onnxslim."""
    axes: dict[int, Any] = {0: torch.export.Dim("batch", min=1)}
    if sides is not None:
        low, high = sides
        axes[2] = INPUT_MULTIPLE * torch.export.Dim("height_32", min=low, max=high)
        axes[3] = INPUT_MULTIPLE * torch.export.Dim("width_32", min=low, max=high)
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            opset_version=opset,
            external_data=False,
            input_names=["images"],
            output_names=wrapper.output_names,
            dynamic_shapes={"images": axes},
            verbose=False,
        )
    proto = program.model_proto
    if slim:
        import onnxslim

        with _quiet_exporter():
            proto = onnxslim.slim(proto)
    return proto


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: int | tuple[int, int],
    mode: str = "detections",
    layout: str = "standard",
    top_k: int = 100,
    fp16: bool = False,
    input_dtype: str = "uint8",
    dynamic_hw: bool = False,
    opset: int = OPSET,
    metadata: dict[str, Any] | None = None,
    slim: bool = True,
) -> dict:
    """Export `model` (a CenterNet in eval mode) to one self-contained ONNX file.

    Dynamic batch always; dynamic height/width (multiples of 32) with `dynamic_hw`. Returns a
    summary (graph_summary + file size, sha256, seconds). `metadata` goes into metadata_props
    (non-string values as JSON) for the predictor."""
    height, width = check_options(mode, input_dtype, image_size, top_k, opset, layout)
    num_classes = int(getattr(model, "num_classes", 1))
    min_side, max_side = _dynamic_sizes(num_classes, top_k, height, width, dynamic_hw)
    wrapper = ExportWrapper(model.eval(), mode, top_k, fp16, layout).eval()
    # Batch 2 in the example: torch.export specialises sizes 0 and 1.
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (2, 3, height, width), generator=generator)
    started = time.perf_counter()
    proto = _trace_to_onnx(
        wrapper,
        example.to(INPUT_DTYPES[input_dtype]),
        (min_side, max_side) if dynamic_hw else None,
        opset,
        slim,
    )
    tagged = _tag_postprocess(proto)
    props = {
        "centerx_format": METADATA_FORMAT,
        "mode": mode,
        "layout": layout,
        "image_size": height if height == width else [height, width],
        "input_dtype": input_dtype,
        "input_range": "0..255 RGB, normalised in the graph",
        "stride": INPUT_MULTIPLE,
        "output_stride": wrapper.stride,
        "top_k": top_k,
        "fp16": fp16,
        "dynamic_hw": dynamic_hw,
        "min_side": min_side * INPUT_MULTIPLE if dynamic_hw else None,
        "max_side": max_side * INPUT_MULTIPLE if dynamic_hw else None,
        "opset": opset,
        "outputs": wrapper.output_names,
        **(metadata or {}),
    }
    onnx.helper.set_model_props(
        proto,
        {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items() if v is not None},
    )
    proto.doc_string = f"centerx CenterNet, {mode} mode, post-processing in the graph"
    return _check_and_save(proto, Path(path), opset) | {
        "seconds": round(time.perf_counter() - started, 2),
        "slimmed": slim,
        "postprocess_nodes": tagged,
    }


def _check_and_save(proto: onnx.ModelProto, path: Path, opset: int) -> dict:
    """Check the graph (opset, onnx.checker) and write it as one file; its summary and hash."""
    summary = graph_summary(proto)
    if summary["opset"] != opset:
        raise ExportError(
            f"the exporter produced opset {summary['opset']}, not the requested {opset}"
        )
    onnx.checker.check_model(proto, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    data = path.read_bytes()
    return {
        "path": str(path),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "exporter": f"torch.onnx.export(dynamo=True) torch {torch.__version__}, onnx {onnx.__version__}",
        **summary,
    }


def export_torchscript(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: int,
    mode: str = "detections",
    layout: str = "standard",
    top_k: int = 100,
    input_dtype: str = "uint8",
    batch: int = 1,
    metadata: dict[str, Any] | None = None,
) -> dict:
    """The same wrapper as TorchScript (FP32, fixed shape [batch,3,S,S]) for libtorch users;
    metadata in the archive's extra file `centerx.json`.

    Traced from the torch.export program rather than from the module: tracing the module
    directly turns the model's shape arithmetic (stride bookkeeping of the skips) into tensors.
    A traced graph also fixes the batch size. TorchScript is deprecated in torch 2.13 but runs."""
    height, width = check_options(mode, input_dtype, image_size, top_k, OPSET, layout)
    wrapper = ExportWrapper(model.eval(), mode, top_k, layout=layout).eval()
    example = torch.zeros(batch, 3, height, width, dtype=INPUT_DTYPES[input_dtype])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(wrapper, (example,))
        traced = torch.jit.trace(program.module(), (example,), check_trace=False)
        extra = {
            "centerx.json": json.dumps(
                {
                    "mode": mode,
                    "outputs": wrapper.output_names,
                    "top_k": top_k,
                    "input_shape": list(example.shape),
                    **(metadata or {}),
                }
            )
        }
        torch.jit.save(traced, str(path), _extra_files=extra)
    return {
        "path": str(path),
        "bytes": Path(path).stat().st_size,
        "input_shape": list(example.shape),
    }


def sample_images(data_cfg: dict | None, image_size: int, count: int) -> tuple[np.ndarray, str]:
    """Letterboxed uint8 images [N,3,S,S] from the checkpoint's validation data (what the
    evaluator sees); random images when that data cannot be built here."""
    if data_cfg and count > 0:
        try:
            _, val = build_sources(OmegaConf.create(data_cfg))
            batch = [
                letterbox(val.load_image(index), image_size)[0].transpose(2, 0, 1)
                for index in range(min(count, len(val)))
            ]
            return np.ascontiguousarray(np.stack(batch)), f"validation data ({len(batch)} images)"
        except Exception as err:  # any data problem: fall back rather than fail the export
            log.warning(
                "cannot load validation images for the parity check (%s); using random", err
            )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (max(count, 1), 3, image_size, image_size), dtype=np.uint8)
    return images, f"random images ({len(images)})"


# ---------------------------------------------------------------------------------------------
# The `export` subcommand
# ---------------------------------------------------------------------------------------------


def _graph_options(cfg: DictConfig) -> dict[str, Any]:
    """conf/export.yaml's options of the graph itself, validated before the checkpoint loads."""
    options = {
        "mode": str(cfg.mode),
        "layout": str(cfg.layout),
        "input_dtype": str(cfg.input_dtype),
        "top_k": int(cfg.top_k),
        "opset": int(cfg.opset),
    }
    check_options(
        options["mode"],
        options["input_dtype"],
        int(cfg.image_size or INPUT_MULTIPLE),
        options["top_k"],
        options["opset"],
        options["layout"],
    )
    return options | {"fp16": bool(cfg.fp16), "dynamic_hw": bool(cfg.dynamic_hw)}


def _checkpoint_metadata(checkpoint: str, state: dict) -> dict[str, Any]:
    """What the predictor reads from the ONNX file: classes, and the run's data and model."""
    config = state.get("config") or {}
    return {
        "class_names": list(state["class_names"]),
        "config": {"data": config.get("data")},
        "model_config": state.get("model_config"),
        "checkpoint": checkpoint,
        "epoch": state.get("epoch"),
    }


def _verify(model: nn.Module, report: dict, cfg: DictConfig, images: np.ndarray, where: str):
    """Parity of the written files with PyTorch, into the report and the log."""
    parity = verify_onnx(
        model,
        report["onnx"]["path"],
        images,
        top_k=int(cfg.top_k),
        score_threshold=float(cfg.score_threshold),
    )
    report["parity"] = parity | {"inputs": where}
    (log.info if parity["passed"] else log.error)(
        "parity with PyTorch (%s, %s): %s", parity["precision"], where, _parity_line(parity)
    )
    if "torchscript" in report:
        report["torchscript"]["parity"] = verify_torchscript(
            model,
            report["torchscript"]["path"],
            images,
            names=[output["name"] for output in report["onnx"]["outputs"]],
            top_k=int(cfg.top_k),
        )


def export_task(cfg: DictConfig) -> dict:
    """conf/export.yaml: checkpoint -> out_dir/model.onnx (+ model.torchscript.pt) + export.json."""
    if not cfg.get("checkpoint"):
        raise ExportError("say which checkpoint to export: checkpoint=PATH.pt")
    options = _graph_options(cfg)
    model, state = model_from_checkpoint(cfg.checkpoint)
    image_size = int(cfg.image_size or state["image_size"])
    out_dir = Path(cfg.out_dir) if cfg.get("out_dir") else run_dir()
    metadata = _checkpoint_metadata(str(cfg.checkpoint), state)
    report: dict[str, Any] = {
        "checkpoint": str(cfg.checkpoint),
        "options": OmegaConf.to_container(cfg, resolve=True),
        "class_names": metadata["class_names"],
    }
    outputs = ("model.onnx", "model.torchscript.pt", "export.json")
    with run_directory.claim(out_dir, overwrite=bool(cfg.get("overwrite")), outputs=outputs):
        onnx_path = out_dir / "model.onnx"
        report["onnx"] = export_onnx(
            model, onnx_path, image_size=image_size, metadata=metadata, **options
        )
        log.info("wrote %s (%.1f MB)", onnx_path, report["onnx"]["bytes"] / 1e6)
        if cfg.torchscript:
            report["torchscript"] = export_torchscript(
                model,
                out_dir / "model.torchscript.pt",
                image_size=image_size,
                metadata={"class_names": metadata["class_names"], "image_size": image_size},
                **{k: options[k] for k in ("mode", "layout", "top_k", "input_dtype")},
            )
        if cfg.verify:
            data_cfg = (state.get("config") or {}).get("data")
            images, where = sample_images(data_cfg, image_size, int(cfg.verify_images))
            _verify(model, report, cfg, images, where)
        (out_dir / "export.json").write_text(json.dumps(report, indent=1, default=str))
    precision = "fp16" if options["fp16"] else "fp32"
    print(f"exported {onnx_path} ({options['mode']}, {precision}, {options['input_dtype']} input)")
    if "parity" in report:
        print(f"parity vs PyTorch: {_parity_line(report['parity'])}")
    return {
        "onnx": str(onnx_path),
        "parity_passed": report.get("parity", {}).get("passed"),
        "run_dir": str(out_dir),
    }


def _parity_line(parity: dict) -> str:
    dets = parity.get("detections_top_k") or parity.get("detections_above_threshold") or {}
    return (
        f"{'PASSED' if parity['passed'] else 'FAILED'}: matched {dets.get('matched')}/"
        f"{dets.get('reference')}, missing {dets.get('missing')}, extra {dets.get('extra')}, "
        f"max box rel {dets.get('max_box_rel', 0):.2e}, max score abs {dets.get('max_score_abs', 0):.2e}"
    )
