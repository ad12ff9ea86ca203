"""centerx deployment kit (importable as `centerx_export`): numpy, OpenCV and onnxruntime only.

- `imaging`:   read images and videos, letterbox, map boxes back, draw (centerx uses these too).
- `predictor`: run a model.onnx (`OnnxDetector`), the predictions.json schema, and the one
               predict-on-files loop (images and videos) every backend uses.
- `tensorrt`:  build a TensorRT engine from model.onnx with trtexec, and run it.

The kit is the bottom layer: it imports no torch and nothing from centerx (onnxruntime only when
a session is built), so these files can be copied to a device on their own. The exporter that
writes model.onnx needs torch and lives in centerx (`centerx.exporter`).
Nothing is imported here.
"""
