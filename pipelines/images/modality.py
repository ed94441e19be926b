"""The image plug-in: files of any common format -> a (height, width, channels) uint8 tensor,
stored raw (default) or as PNG; models normalise pixels inside the graph."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from deepspark.modality import Modality, Preprocess, TensorSpec
from pipelines.images import transforms

COLUMN = "image"
GLOB = "*.{png,PNG,jpg,JPG,jpeg,JPEG,bmp,BMP,gif,GIF,tif,TIF,tiff,TIFF,webp,WEBP}"


class ImageModality(Modality):
    name = "image"
    rules_type = transforms.ImageRules
    default_glob = GLOB
    default_model = "convnet"
    models = {
        "convnet": "the classic Keras convnet (Keras' mnist_cnn: 2 conv, max-pool, dropout, dense 128)",
        "mlp": "a small dense network (flatten, dense 128, dropout, dense): cheap enough to fuse several per step",
        "resnet_small": "a small ResNet: 3 stages of 2 residual blocks (16/32/64 filters), global pooling",
        "mobilenet_v2": "Keras' MobileNetV2 with a new head; weights from model.params.weights (a file)",
        "efficientnet_b0": "Keras' EfficientNetB0 with a new head; weights from model.params.weights (a file)",
        "resnet50": "Keras' ResNet50 with a new head; weights from model.params.weights (a file)",
    }
    models_module = "pipelines.images.models"

    def spec(self, rules: transforms.ImageRules, state: Mapping[str, Any]) -> TensorSpec:
        return TensorSpec(COLUMN, (rules.height, rules.width, rules.channels), "uint8", rules.encoding)

    def preprocessor(self, rules: transforms.ImageRules, state: Mapping[str, Any]) -> Preprocess:
        return lambda payload: transforms.decode_or_reason(payload, rules)

    def input_statistics(self, tensors: np.ndarray, rules: transforms.ImageRules, state: Mapping[str, Any]
                         ) -> dict[str, np.ndarray]:
        """Brightness and contrast (mean and standard deviation of the pixels, 0-1) and sharpness
        (mean absolute difference of neighbouring pixels, 0-1): darker photos, washed-out scans
        and blur move them."""
        x = np.asarray(tensors, np.float32) / 255.0
        flat = x.reshape(len(x), -1)
        sharpness = (np.abs(np.diff(x, axis=1)).mean(axis=(1, 2, 3)) + np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))) / 2
        return {"brightness": flat.mean(axis=1), "contrast": flat.std(axis=1), "sharpness": sharpness}

    def encode(self, tensor: np.ndarray, spec: TensorSpec) -> bytes:
        if spec.encoding == "raw":
            return super().encode(tensor, spec)
        import cv2

        if tensor.shape != spec.shape or tensor.dtype != np.uint8:
            raise ValueError(f"expected uint8 {spec.shape}, got {tensor.dtype} {tensor.shape}")
        ok, buf = cv2.imencode(".png", tensor if spec.shape[2] == 1 else tensor[:, :, ::-1])
        if not ok:
            raise ValueError("PNG encoding failed")
        return buf.tobytes()

    def decode(self, values: Sequence[bytes], spec: TensorSpec) -> np.ndarray:
        if spec.encoding == "raw":
            return super().decode(values, spec)
        import cv2

        out = np.empty((len(values), *spec.shape), dtype=np.uint8)
        gray = spec.shape[2] == 1
        for i, value in enumerate(values):
            img = cv2.imdecode(np.frombuffer(value, dtype=np.uint8), cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
            out[i] = img.reshape(spec.shape) if gray else img[:, :, ::-1]
        return out


IMAGE = ImageModality()
