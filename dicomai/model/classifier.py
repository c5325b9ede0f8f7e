"""ONNX inference: one onnxruntime session per model, created once, a bounded batch per run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from dicomai.imaging.pixels import Letterbox, letterbox
from dicomai.model.package import ModelError, ModelPackage

__all__ = ["MAX_BATCH", "Classifier", "ModelInput", "ModelOutput", "preprocess"]

#: Images per onnxruntime run in the node. The run's buffers grow with the batch (about 40 MB
#: per image with the shipped ensemble and its Grad-CAM) and onnxruntime's arena keeps the
#: largest it ever held, so a study of many images would leave the node that much larger for
#: good; one at a time costs a few milliseconds per image on a CPU.
MAX_BATCH = 1


@dataclass(frozen=True)
class ModelInput:
    """One image ready for the model, with the geometry to map results back."""

    tensor: NDArray[np.float32]  # C x H x W
    geometry: Letterbox


@dataclass(frozen=True)
class ModelOutput:
    probability: float  # of the positive class
    gradcam: NDArray[np.float32] | None  # the model's grid, not yet on the image


def preprocess(display: NDArray[np.float32], package: ModelPackage) -> ModelInput:
    """Letterbox into the input size, replicate channels, apply mean/std."""
    m = package.manifest
    boxed, geom = letterbox(display, m.input.height, m.input.width, m.preprocessing.pad_value)
    mean = np.asarray(m.preprocessing.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(m.preprocessing.std, dtype=np.float32)[:, None, None]
    chw = np.repeat(boxed[None, :, :], m.input.channels, axis=0)
    return ModelInput(((chw - mean) / std).astype(np.float32), geom)


class Classifier:
    """Holds the onnxruntime session; :meth:`predict` runs inputs ``max_batch`` at a time."""

    def __init__(self, package: ModelPackage, threads: int = 0,
                 providers: list[str] | None = None, max_batch: int = MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch} < 1")
        self.package = package
        self.max_batch = max_batch
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        available = ort.get_available_providers()
        wanted = providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]
        chosen = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(package.onnx_path), opts, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(package.directory, f"onnxruntime cannot load model.onnx: {exc}") from exc
        m = package.manifest
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if m.input.name not in inputs:
            raise ModelError(package.directory, f"input {m.input.name!r} not in the graph ({list(inputs)})")
        shape = inputs[m.input.name].shape
        expected = [m.input.channels, m.input.height, m.input.width]
        if len(shape) != 4 or [d if isinstance(d, int) else None for d in shape[1:]] != expected:
            raise ModelError(package.directory, f"graph input shape {shape} does not match the "
                                                f"manifest's N x {expected}")
        for name in (m.outputs.probabilities, m.outputs.gradcam):
            if name is not None and name not in outputs:
                raise ModelError(package.directory, f"output {name!r} not in the graph ({sorted(outputs)})")
        self.providers = self.session.get_providers()

    def predict(self, inputs: list[ModelInput]) -> list[ModelOutput]:
        """Probabilities (and Grad-CAM grids when the model has them), one per input, in order;
        run ``max_batch`` inputs at a time."""
        out: list[ModelOutput] = []
        for start in range(0, len(inputs), self.max_batch):
            out += self._run(inputs[start:start + self.max_batch])
        return out

    def _run(self, inputs: list[ModelInput]) -> list[ModelOutput]:
        m = self.package.manifest
        batch = np.stack([i.tensor for i in inputs]).astype(np.float32)
        names = [m.outputs.probabilities] + ([m.outputs.gradcam] if m.outputs.gradcam else [])
        results = self.session.run(names, {m.input.name: batch})
        probs = np.asarray(results[0], dtype=np.float64)
        if probs.ndim != 2 or probs.shape != (len(inputs), len(m.labels)):
            raise ModelError(self.package.directory,
                             f"probabilities shape {probs.shape}, expected {(len(inputs), len(m.labels))}")
        cams = np.asarray(results[1], dtype=np.float32) if m.outputs.gradcam else None
        if cams is not None and cams.ndim == 4:  # N x 1 x h x w
            cams = cams[:, 0]
        out = []
        for i in range(len(inputs)):
            p = float(np.clip(probs[i, m.positive_index], 0.0, 1.0))
            out.append(ModelOutput(p, cams[i] if cams is not None else None))
        return out
