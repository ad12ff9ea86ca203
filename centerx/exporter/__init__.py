"""The torch side of deployment: checkpoint -> ONNX (and TorchScript), and parity with PyTorch.

- `onnx`:   `export_task` (`run.sh export`), `export_onnx`, `export_torchscript`.
- `parity`: what "the same detections" means, measured against PyTorch eager.

Depends on centerx and on the torch-free kit (`centerx_export`, which runs the exported file);
nothing in centerx's core (data, model, losses, engine, utils) imports this package.
"""
