"""The image captioner that pseudo-captions the unlabelled train images (``text.pseudo_ratio``; trained
once for every family by the ``caption-text`` stage, :mod:`.captions`), its retrieval space (the
cosine that both the bank and reranking score by), and the code bank of the train images' code maps
(``text.bank``) that it captions for retrieval."""

from __future__ import annotations

import numpy as np
import torch

from latentforge.models.text import CAPTIONER_LR, CAPTIONER_WEIGHT_DECAY, CodeBank, ImageCaptioner, retrieval_space
from latentforge.pipelines.imaging import batch_to_tensor


def fit_captioner(images: np.ndarray, embedding: np.ndarray, epochs: int, batch_size: int,
                  seed: int) -> tuple[ImageCaptioner, float]:
    """Train :class:`models.text.ImageCaptioner` on the aligned (image, embedding) pairs, in this process
    (the ``caption-text`` stage, once for every family); return it and its last epoch's mean cosine to
    the captions. ``images`` (N, H, W, C) uint8, ``embedding`` (N, E) float32."""
    torch.manual_seed(seed)
    captioner = ImageCaptioner(images.shape[-1], embedding.shape[1])
    optimizer = torch.optim.AdamW(captioner.parameters(), CAPTIONER_LR, weight_decay=CAPTIONER_WEIGHT_DECAY)
    batch_size = max(1, min(batch_size, len(images)))
    steps = max(1, len(images) // batch_size)
    rng = np.random.default_rng(seed)
    cosine = 0.0
    for _ in range(epochs):
        captioner.train()
        perm, total = rng.permutation(len(images)), 0.0
        for s in range(steps):
            idx = np.sort(perm[s * batch_size:(s + 1) * batch_size])
            target = torch.from_numpy(embedding[idx])
            loss = 1 - (captioner(batch_to_tensor(images[idx])) * torch.nn.functional.normalize(target, dim=-1)).sum(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += 1 - loss.item()
        cosine = total / steps
    return captioner.eval(), cosine


def caption(captioner: ImageCaptioner, images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, E) float32 pseudo-caption embeddings."""
    with torch.no_grad():
        return np.concatenate([captioner(batch_to_tensor(images[i:i + 512])).numpy() for i in range(0, len(images), 512)]).astype(np.float32)


def scoring_space(arrays: dict[str, np.ndarray], captioner: ImageCaptioner, whitening: float | None,
                  space: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(centre, whiten) of the retrieval space of the aligned pairs (:func:`models.text.retrieval_space`):
    their captions' residuals from the captioner (``space`` residuals) or the captions themselves
    (captions); (None, None) for a plain cosine (``whitening`` None)."""
    if whitening is None:
        return None, None
    captions = torch.from_numpy(arrays["embedding"])
    predictions = torch.from_numpy(caption(captioner, arrays["image"])) if space == "residuals" else None
    return retrieval_space(captions, whitening, predictions)


def code_bank(arrays: dict[str, np.ndarray], captioner: ImageCaptioner | None, text_weight: float,
              space_of: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)) -> CodeBank:
    """:class:`models.text.CodeBank` of every train image the job has (aligned and unlabelled; the tier (b)
    combinations are not among them, :func:`pipelines.text.aligned.prepare_arrays`): their code maps, the
    train-split row of each, and, when a captioner was trained, its embeddings of them (else the bank
    scores by f_tau's likelihood alone) in the retrieval space ``space_of`` (:func:`scoring_space`)."""

    def both(key: str) -> np.ndarray:
        return np.concatenate([arrays[key], arrays[f"pseudo_{key}"]]) if f"pseudo_{key}" in arrays else arrays[key]

    top, bottom, rows = both("top"), both("bottom"), both("row")
    # One entry per distinct code map: a repeated map is the same latent, and n picks should be n images.
    _, keep = np.unique(np.concatenate([top.reshape(len(top), -1), bottom.reshape(len(bottom), -1)], 1), axis=0, return_index=True)
    keep = np.sort(keep)
    codes = (torch.from_numpy(top[keep]), torch.from_numpy(bottom[keep]))
    row_ids = torch.from_numpy(rows[keep].astype(np.int64))
    if captioner is None:
        return CodeBank(*codes, rows=row_ids)
    embedding = torch.from_numpy(caption(captioner, both("image")[keep]))
    return CodeBank(*codes, embedding, text_weight, *space_of, rows=row_ids)
