"""TensorRT: build an engine from a centerx model.onnx with `trtexec`, and run it.

    python export/tensorrt.py build --onnx model.onnx --engine model.engine --precision fp16
    python export/tensorrt.py run --engine model.engine --input IMAGES_FOLDERS_OR_VIDEOS --out DIR

Needs an NVIDIA GPU, TensorRT's `trtexec` (on PATH or $TRTEXEC) for building, and for running
the `tensorrt` Python package plus either `polygraphy` or `cuda-python`. Without them every
entry point fails with a message that says which piece is missing.

NOT VERIFIED on a GPU: this file was written and its skip path tested on a machine without
one (see export/README.md, "What was verified where"). The ONNX it consumes was checked to
contain only ops TensorRT 8.5+ and 10 parse (no Mod, constant TopK K, opset 17).

Precision choices:
- fp32: `trtexec` defaults.
- fp16: `--fp16`, with the post-processing layers (every ONNX node named `postprocess/...`,
  i.e. downstream of the heatmap sigmoid) pinned to FP32 by `--precisionConstraints=obey
  --layerPrecisions=...`: if TensorRT ran MaxPool in FP16 but compared its result with the FP32
  sigmoid, `Equal` would fail at most peaks. Use an FP32 ONNX (fp16=false) for this path.
- typed: `--stronglyTyped` (TensorRT >= 10) for an ONNX exported with fp16=true: TensorRT then
  follows the ONNX types (network FP16, post-processing FP32) as onnxruntime does.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

try:
    from centerx_export import predictor as _predictor
except ImportError:  # copied next to predictor.py and imaging.py on a device
    import predictor as _predictor  # type: ignore[no-redef]

PRECISIONS = ("fp32", "fp16", "typed")


class TensorRTError(RuntimeError):
    """TensorRT is missing, or an engine could not be built or run."""


def find_trtexec() -> str | None:
    candidate = os.environ.get("TRTEXEC") or shutil.which("trtexec")
    if candidate and Path(candidate).is_file():
        return candidate
    for path in ("/usr/src/tensorrt/bin/trtexec", "/usr/local/tensorrt/bin/trtexec"):
        if Path(path).is_file():
            return path
    return None


def has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and "GPU" in done.stdout


def unavailable_reason() -> str | None:
    """None when an engine can be built and run here; else what is missing."""
    missing = []
    if not has_gpu():
        missing.append("no NVIDIA GPU (nvidia-smi finds none)")
    if find_trtexec() is None:
        missing.append("no trtexec (install TensorRT, or set $TRTEXEC)")
    if tensorrt_module() is None:
        missing.append("no `tensorrt` Python package")
    if not _has_module("polygraphy") and not _has_module("cuda"):
        missing.append("neither `polygraphy` nor `cuda-python` for device buffers")
    return "; ".join(missing) or None


def tensorrt_module():
    """NVIDIA's `tensorrt` package, or None. Run as `python export/tensorrt.py`, this file's
    folder is first on sys.path and `import tensorrt` would find this file itself."""
    here = Path(__file__).resolve()
    cached = sys.modules.get("tensorrt")
    if cached is not None and Path(getattr(cached, "__file__", "") or "").resolve() == here:
        del sys.modules["tensorrt"]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here.parent]
    try:
        return importlib.import_module("tensorrt")
    except ImportError:
        return None
    finally:
        sys.path[:] = saved


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def read_onnx_metadata(onnx_path: str | Path) -> dict:
    """metadata_props and the input shape of a centerx ONNX file (no torch needed)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    meta = _predictor.parse_metadata({p.key: p.value for p in proto.metadata_props})
    tensor = proto.graph.input[0].type.tensor_type
    meta["input_name"] = proto.graph.input[0].name
    meta["input_shape"] = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    meta["postprocess_layers"] = [
        n.name for n in proto.graph.node if n.name.startswith("postprocess/")
    ]
    return meta


def trtexec_command(
    onnx_path: str | Path,
    engine_path: str | Path,
    metadata: dict,
    precision: str = "fp32",
    max_batch: int = 8,
    opt_batch: int = 1,
    hw: tuple[int, int] | None = None,
    max_hw: tuple[int, int] | None = None,
    workspace_mib: int = 2048,
) -> list[str]:
    """The trtexec command line: shape profile from the model (dynamic batch; dynamic H/W
    between `hw` (default min_side) and `max_hw` when exported with dynamic_hw)."""
    if precision not in PRECISIONS:
        raise TensorRTError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    trtexec = find_trtexec()
    if trtexec is None:
        raise TensorRTError("trtexec not found: install TensorRT or set $TRTEXEC to its path")
    name = metadata.get("input_name", "images")
    size = metadata.get("image_size", 512)
    height, width = (size, size) if isinstance(size, int) else size
    if metadata.get("dynamic_hw"):
        low = hw or (metadata.get("min_side") or 32,) * 2
        high = max_hw or (height, width)
    else:
        low = high = (height, width)

    def shape(batch: int, hw_: Sequence[int]) -> str:
        return f"{name}:{batch}x3x{hw_[0]}x{hw_[1]}"

    command = [
        trtexec,
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        f"--minShapes={shape(1, low)}",
        f"--optShapes={shape(opt_batch, (height, width))}",
        f"--maxShapes={shape(max_batch, high)}",
        f"--memPoolSize=workspace:{workspace_mib}",
    ]
    if precision == "fp16":
        if metadata.get("fp16"):
            raise TensorRTError(
                "this ONNX is already FP16: build it with precision=typed (TensorRT 10), "
                "or export fp16=false and use precision=fp16"
            )
        command.append("--fp16")
        layers = metadata.get("postprocess_layers") or []
        if layers:
            command += [
                "--precisionConstraints=obey",
                "--layerPrecisions=" + ",".join(f"{layer}:fp32" for layer in layers),
            ]
    elif precision == "typed":
        command.append("--stronglyTyped")
    return command


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    precision: str = "fp32",
    max_batch: int = 8,
    **options,
) -> Path:
    """Build with trtexec; writes the engine, `<engine>.json` (the model's metadata, for the
    runner) and `<engine>.log` (trtexec's output). Raises TensorRTError with the log's tail."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise TensorRTError(f"ONNX model not found: {onnx_path}")
    metadata = read_onnx_metadata(onnx_path)
    command = trtexec_command(onnx_path, engine_path, metadata, precision, max_batch, **options)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(command, capture_output=True, text=True)
    log_text = " ".join(command) + "\n" + done.stdout + done.stderr
    engine_path.with_suffix(".log").write_text(log_text)
    if done.returncode != 0 or not engine_path.is_file():
        tail = "\n".join(log_text.splitlines()[-30:])
        raise TensorRTError(f"trtexec failed ({done.returncode}) for {onnx_path}:\n{tail}")
    metadata["precision"] = precision
    metadata["onnx"] = str(onnx_path)
    engine_path.with_suffix(".json").write_text(json.dumps(metadata, indent=1))
    return engine_path


class _PolygraphyBackend:
    def __init__(self, engine_bytes: bytes) -> None:
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.runner = TrtRunner(EngineFromBytes(engine_bytes))
        self.runner.activate()

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.array(v, copy=True) for k, v in self.runner.infer(feeds).items()}


class _CudaPythonBackend:
    """tensorrt's name-based API (>= 8.5) with cuda-python for device memory."""

    def __init__(self, engine_bytes: bytes) -> None:
        trt = tensorrt_module()
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # older cuda-python
        self.trt, self.cudart = trt, cudart
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise TensorRTError("TensorRT could not deserialize the engine (version mismatch?)")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        _, self.stream = cudart.cudaStreamCreate()

    def _check(self, result) -> object:
        error = result[0] if isinstance(result, tuple) else result
        if int(error) != 0:
            raise TensorRTError(f"CUDA error {error}")
        return result[1] if isinstance(result, tuple) and len(result) > 1 else None

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, cudart = self.trt, self.cudart
        allocations, outputs = [], {}
        try:
            for name in self.names:
                if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                    array = np.ascontiguousarray(feeds[name])
                    self.context.set_input_shape(name, array.shape)
                    pointer = self._check(cudart.cudaMalloc(array.nbytes))
                    allocations.append(pointer)
                    self._check(
                        cudart.cudaMemcpy(
                            pointer,
                            array.ctypes.data,
                            array.nbytes,
                            cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                        )
                    )
                    self.context.set_tensor_address(name, int(pointer))
            for name in self.names:
                if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                    shape = tuple(self.context.get_tensor_shape(name))
                    dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
                    host = np.empty(shape, dtype)
                    pointer = self._check(cudart.cudaMalloc(max(host.nbytes, 1)))
                    allocations.append(pointer)
                    self.context.set_tensor_address(name, int(pointer))
                    outputs[name] = (host, pointer)
            if not self.context.execute_async_v3(self.stream):
                raise TensorRTError("TensorRT execution failed")
            self._check(cudart.cudaStreamSynchronize(self.stream))
            for host, pointer in outputs.values():
                self._check(
                    cudart.cudaMemcpy(
                        host.ctypes.data,
                        pointer,
                        host.nbytes,
                        cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                    )
                )
            return {name: host for name, (host, _) in outputs.items()}
        finally:
            for pointer in allocations:
                cudart.cudaFree(pointer)


class TensorRTDetector(_predictor.OnnxDetector):
    """A built engine as a predictor: the same decode, letterbox and drawing as OnnxDetector.

    `onnx_path` supplies the metadata when `<engine>.json` (written by build_engine) is absent.
    TensorRT 8 returns int32 classes; they come back as int64 like onnxruntime's."""

    def __init__(
        self, engine_path: str | Path, onnx_path: str | Path | None = None, top_k: int = 100
    ) -> None:
        reason = unavailable_reason()
        if reason:
            raise TensorRTError(f"cannot run TensorRT here: {reason}")
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise TensorRTError(f"engine not found: {self.path}")
        sidecar = self.path.with_suffix(".json")
        if sidecar.is_file():
            self.metadata = json.loads(sidecar.read_text())
        elif onnx_path is not None:
            self.metadata = read_onnx_metadata(onnx_path)
        else:
            raise TensorRTError(f"no {sidecar.name} next to the engine: pass onnx_path=")
        self.mode = self.metadata["mode"]
        self.class_names = list(self.metadata["class_names"])
        self.image_size = int(self.metadata["image_size"])
        self.stride = int(self.metadata.get("stride", 32))
        self.output_stride = int(self.metadata.get("output_stride", 4))
        self.top_k = int(top_k)
        self.input_name = self.metadata.get("input_name", "images")
        self.input_shape = [
            d if isinstance(d, int) and d > 0 else "dynamic"
            for d in self.metadata.get("input_shape", ["batch", 3, "h", "w"])
        ]
        self.input_dtype = np.uint8 if self.metadata.get("input_dtype") == "uint8" else np.float32
        engine_bytes = self.path.read_bytes()
        self.backend = (
            _PolygraphyBackend(engine_bytes)
            if _has_module("polygraphy")
            else _CudaPythonBackend(engine_bytes)
        )

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.backend.infer({self.input_name: self._prepare(images)})
        if "classes" in outputs:
            outputs["classes"] = outputs["classes"].astype(np.int64)
        return outputs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build and run TensorRT engines of centerx models")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="model.onnx -> engine with trtexec")
    build.add_argument("--onnx", required=True)
    build.add_argument("--engine", required=True)
    build.add_argument("--precision", choices=PRECISIONS, default="fp32")
    build.add_argument("--max-batch", type=int, default=8)
    run = sub.add_parser("run", help="predict on images and videos with a built engine")
    run.add_argument("--engine", required=True)
    run.add_argument("--onnx", default=None, help="metadata source if <engine>.json is missing")
    run.add_argument("--input", required=True, nargs="+")
    run.add_argument("--out", default="predictions")
    run.add_argument("--score-threshold", type=float, default=0.3)
    sub.add_parser("check", help="say whether TensorRT can be used here")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            reason = unavailable_reason()
            print(f"TensorRT unavailable: {reason}" if reason else "TensorRT available")
            return 1 if reason else 0
        if args.command == "build":
            engine = build_engine(args.onnx, args.engine, args.precision, args.max_batch)
            print(f"wrote {engine} (log: {engine.with_suffix('.log')})")
            return 0
        detector = TensorRTDetector(args.engine, args.onnx)
        summary = _predictor.predict_files(
            detector.as_model(), args.input, args.out, args.score_threshold
        )
        print(_predictor.describe(summary, args.out))
        return 0
    except (TensorRTError, FileNotFoundError, ValueError, _predictor.imaging.VideoError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
