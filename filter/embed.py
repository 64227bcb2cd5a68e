"""Encoder embeddings, CLIP image-text scores and nsfw scores through Beam's RunInference.

`EncoderModelHandler` loads the frozen encoder from the shared registry (`core.encoders`) once per
worker process and runs batches of preprocessed images (and their alt texts when the encoder has a
text tower). RunInference does the batching (BatchElements) and the per-worker model sharing.
With a `Safety` plan it also scores each image with LAION's NSFW head (`core.safety`): on the
main embedding, or on a second encoder's embedding of the same image (`--safety-encoder`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from core.encoders import Encoder, load_encoder
from core.safety import NsfwHead

# Example: (preprocessed (3,S,S) float32 pixels, alt text or None[, the safety encoder's pixels]).
# Prediction: (embedding, CLIP score, nsfw score).
Example = tuple
Prediction = tuple[np.ndarray, Optional[float], Optional[float]]


@dataclasses.dataclass(frozen=True)
class Safety:
    """How filter scores images for nsfw: the head's arrays (they travel to the workers with the
    pipeline: no worker downloads), and a second encoder when the main one has no head."""

    head: NsfwHead
    encoder: str = ""  # "" : the head reads the main embedding
    weights: str = ""
    image_size: int = 0  # the second encoder's preprocessing
    mean: tuple = (0.5,) * 3
    std: tuple = (0.5,) * 3


@dataclasses.dataclass
class Models:
    """What one worker loads: the encoder, and the safety encoder when there is a second one."""

    encoder: Encoder
    safety: Optional[Encoder] = None


def nsfw_scores(head: NsfwHead, embeddings: np.ndarray) -> np.ndarray:
    """The head on embeddings as filter stores them (float16), so a stored row reproduces its score."""
    return head(np.asarray(embeddings, dtype=np.float16).astype(np.float32))


def score_batch(encoder: Encoder, pixels: np.ndarray, alts: Sequence[Optional[str]]) -> list[tuple[np.ndarray, Optional[float]]]:
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


class EncoderModelHandler(ModelHandler[Example, Prediction, Models]):
    """RunInference handler for any encoder of the registry (plus the optional nsfw scoring)."""

    def __init__(self, name: str, weights: str = "", batch_size: int = 32, fixed_batch: bool = False, safety: Optional[Safety] = None):
        super().__init__()
        self.name, self.weights, self.batch_size, self.fixed_batch, self.safety = name, weights, batch_size, fixed_batch, safety

    def load_model(self) -> Models:
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads()))
        second = load_encoder(self.safety.encoder, self.safety.weights) if self.safety and self.safety.encoder else None
        return Models(load_encoder(self.name, self.weights), second)

    def run_inference(self, batch: Sequence[Example], model: Models, inference_args: Optional[dict[str, Any]] = None) -> Iterable[Prediction]:
        pixels = np.stack([b[0] for b in batch])
        scored = score_batch(model.encoder, pixels, [b[1] for b in batch])
        if self.safety is None:
            return [(emb, score, None) for emb, score in scored]
        if model.safety is not None:
            safety_emb = model.safety.embed_images(np.stack([b[2] for b in batch]))
        else:
            safety_emb = np.stack([emb for emb, _ in scored])
        nsfw = nsfw_scores(self.safety.head, safety_emb)
        return [(emb, score, float(n)) for (emb, score), n in zip(scored, nsfw)]

    def batch_elements_kwargs(self) -> dict:
        return {"min_batch_size": self.batch_size if self.fixed_batch else 1, "max_batch_size": self.batch_size}

    def get_metrics_namespace(self) -> str:
        return "filter_encoder"
