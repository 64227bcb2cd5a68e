"""Encoder embeddings and CLIP image-text scores through Beam's RunInference.

`EncoderModelHandler` loads the frozen encoder from the shared registry (`core.encoders`) once per
worker process and runs batches of preprocessed images (and their alt texts when the encoder has a
text tower). RunInference does the batching (BatchElements) and the per-worker model sharing.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from core.encoders import Encoder, load_encoder

# Example: (preprocessed (3,S,S) float32 pixels, alt text or None). Prediction: (embedding, score).
Example = tuple[np.ndarray, Optional[str]]
Prediction = tuple[np.ndarray, Optional[float]]


def score_batch(encoder: Encoder, pixels: np.ndarray, alts: Sequence[Optional[str]]) -> list[Prediction]:
    """Embed a batch; when the encoder has a text tower, cosine of each image with its alt text."""
    emb = encoder.embed_images(pixels)
    scores: list[Optional[float]] = [None] * len(alts)
    if encoder.has_text:
        idx = [i for i, a in enumerate(alts) if a and a.strip()]
        if idx:
            txt = encoder.embed_texts([alts[i] for i in idx])
            for j, i in enumerate(idx):
                scores[i] = float(emb[i] @ txt[j])
    return [(emb[i], scores[i]) for i in range(len(alts))]


class EncoderModelHandler(ModelHandler[Example, Prediction, Encoder]):
    """RunInference handler for any encoder of the registry."""

    def __init__(self, name: str, weights: str = "", batch_size: int = 32, fixed_batch: bool = False):
        super().__init__()
        self.name, self.weights, self.batch_size, self.fixed_batch = name, weights, batch_size, fixed_batch

    def load_model(self) -> Encoder:
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads()))
        return load_encoder(self.name, self.weights)

    def run_inference(self, batch: Sequence[Example], model: Encoder, inference_args: Optional[dict[str, Any]] = None) -> Iterable[Prediction]:
        pixels = np.stack([b[0] for b in batch])
        return score_batch(model, pixels, [b[1] for b in batch])

    def batch_elements_kwargs(self) -> dict:
        return {"min_batch_size": self.batch_size if self.fixed_batch else 1, "max_batch_size": self.batch_size}

    def get_metrics_namespace(self) -> str:
        return "filter_encoder"
