"""Prompt encoding: text -> the embeddings the pipeline is called with.

One prompt at a time (so an image does not depend on its batch-mates). Prompts longer than
CLIP's 75 tokens are not cut: they are encoded in 75-token chunks whose embeddings are
concatenated, as AUTOMATIC1111 does. SDXL models have two text encoders: each chunk is the
penultimate hidden states of both side by side, and the pooled embedding (which conditions
the UNet with the size "time ids") is the second encoder's, of the first chunk (as A1111).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bot.jobs import GenerationRequest

#: CLIP's context: 77 tokens = start + 75 + end. Longer prompts are encoded in 75-token chunks.
CHUNK_TOKENS = 75


@dataclass(frozen=True)
class Prepared:
    """A request's text embeddings: (1, tokens, dim) each; negative is None without CFG.

    SDXL models also have pooled embeddings, (1, dim) each; None for SD models.
    """

    positive: torch.Tensor
    negative: torch.Tensor | None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return int(self.positive.shape[1])


def encode_prompt(
    pipe: Any, request: GenerationRequest, *, cfg: bool, device: torch.device
) -> Prepared:
    """Text embeddings for one request, one prompt at a time (batch-size independent).

    Prompts longer than CLIP's 75 tokens are not cut: they are encoded in 75-token chunks
    whose embeddings are concatenated (as AUTOMATIC1111 does); the negative prompt is
    padded with empty chunks to the same length.
    """
    if getattr(pipe, "text_encoder_2", None) is not None:
        return _encode_sdxl(pipe, request, cfg=cfg, device=device)
    negative_text = request.negative_prompt.strip()
    chunks = _chunks(pipe, request.prompt)
    negative_chunks = _chunks(pipe, negative_text) if cfg else [[]]
    if len(chunks) == 1 and len(negative_chunks) == 1:
        # The pipeline's own encoder: a short prompt is encoded exactly as diffusers does.
        positive, negative = pipe.encode_prompt(
            request.prompt,
            device,
            1,
            cfg,
            negative_text or None,
        )
        return Prepared(positive, negative if cfg else None)
    n = max(len(chunks), len(negative_chunks))
    positive = _encode_chunks(pipe, chunks, n, device)
    negative = _encode_chunks(pipe, negative_chunks, n, device) if cfg else None
    return Prepared(positive, negative)


def _chunks(pipe: Any, text: str, tokenizer: Any = None) -> list[list[int]]:
    """The prompt's token ids (no start/end tokens) in chunks of CHUNK_TOKENS; at least one."""
    if not text:
        return [[]]
    tokenizer = tokenizer or pipe.tokenizer
    # Multi-vector textual-inversion tokens expand to several ids, as in encode_prompt.
    converted = pipe.maybe_convert_prompt(text, tokenizer)
    ids: list[int] = tokenizer(
        converted, add_special_tokens=False, truncation=False, verbose=False
    ).input_ids
    chunks = [ids[i : i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)]
    return chunks or [[]]


def _rows(tokenizer: Any, chunks: list[list[int]], n: int) -> tuple[list[list[int]], int]:
    """`chunks` (padded with empty ones to `n`) as 77-id rows with start, end and padding;
    and the padding id."""
    length = CHUNK_TOKENS + 2
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for chunk in chunks + [[]] * (n - len(chunks)):
        ids = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
        rows.append(ids + [pad] * (length - len(ids)))
    return rows, pad


def _encode_chunks(pipe: Any, chunks: list[list[int]], n: int, device: torch.device) -> Any:
    """Encode `chunks` (padded with empty ones to `n`) -> (1, 77 * n, dim) embeddings."""
    tokenizer = pipe.tokenizer
    rows, pad = _rows(tokenizer, chunks, n)
    config = pipe.text_encoder.config
    embeddings = []
    for ids in rows:  # one chunk per call, like the short path (batch-size independent)
        input_ids = torch.tensor([ids], device=device)
        mask = None
        if getattr(config, "use_attention_mask", False):
            mask = (input_ids != pad).long()
            mask[:, : ids.index(tokenizer.eos_token_id) + 1] = 1
        embeddings.append(pipe.text_encoder(input_ids, attention_mask=mask)[0])
    return torch.cat(embeddings, dim=1).to(dtype=pipe.text_encoder.dtype)


def _encode_sdxl(
    pipe: Any, request: GenerationRequest, *, cfg: bool, device: torch.device
) -> Prepared:
    """encode_prompt for SDXL's two text encoders (pooled embeddings included)."""
    negative_text = request.negative_prompt.strip()
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
    chunks = [_chunks(pipe, request.prompt, t) for t in tokenizers]
    negative_chunks: list[list[list[int]]] = [
        _chunks(pipe, negative_text, t) if cfg else [[]] for t in tokenizers
    ]
    n = max(len(c) for c in (*chunks, *negative_chunks))
    if n == 1:
        # The pipeline's own encoder: a short prompt is encoded exactly as diffusers does.
        positive, negative, pooled, negative_pooled = pipe.encode_prompt(
            request.prompt,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=negative_text or None,
        )
        if not cfg:
            negative = negative_pooled = None
        return Prepared(positive, negative, pooled, negative_pooled)
    positive, pooled = _encode_sdxl_chunks(pipe, chunks, n, device)
    negative = negative_pooled = None
    if cfg and not negative_text and pipe.config.get("force_zeros_for_empty_prompt", True):
        # As diffusers does for an empty negative prompt on SDXL.
        negative, negative_pooled = torch.zeros_like(positive), torch.zeros_like(pooled)
    elif cfg:
        negative, negative_pooled = _encode_sdxl_chunks(pipe, negative_chunks, n, device)
    return Prepared(positive, negative, pooled, negative_pooled)


def _encode_sdxl_chunks(
    pipe: Any, chunks: list[list[list[int]]], n: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tokenizer's `chunks` -> ((1, 77 * n, dim1 + dim2) embeddings, (1, pooled) of the
    first chunk)."""
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
    per_encoder: list[list[torch.Tensor]] = []
    pooled: torch.Tensor | None = None
    for encoder, tokenizer, own in zip(encoders, tokenizers, chunks, strict=True):
        rows, _ = _rows(tokenizer, own, n)
        states = []
        for ids in rows:  # one chunk per call, like the short path (batch-size independent)
            out = encoder(torch.tensor([ids], device=device), output_hidden_states=True)
            states.append(out.hidden_states[-2])  # SDXL reads the penultimate layer
            if encoder is pipe.text_encoder_2 and pooled is None:
                pooled = out[0]
        per_encoder.append(states)
    assert pooled is not None
    dtype = pipe.text_encoder_2.dtype
    chunk_embeds = [torch.cat(pair, dim=-1) for pair in zip(*per_encoder, strict=True)]
    return torch.cat(chunk_embeds, dim=1).to(dtype=dtype), pooled.to(dtype=dtype)
