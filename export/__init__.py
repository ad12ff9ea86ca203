"""centerx deployment kit (importable as `centerx_export`).

- `onnx_export`: checkpoint -> model.onnx with post-processing in the graph (needs torch).
- `predictor`:   run a model.onnx with numpy + OpenCV + onnxruntime only (no torch, no centerx);
                 the file can be copied to a device on its own.
- `tensorrt`:    build a TensorRT engine from model.onnx with trtexec, and run it.

Nothing is imported here, so `import centerx_export.predictor` stays torch-free.
"""
