"""Prompt encoding: text -> the embeddings the pipeline is called with.

One prompt at a time (so an image does not depend on its batch-mates). Prompts longer than
CLIP's 75 tokens are not cut: they are encoded in 75-token chunks whose embeddings are
concatenated, as AUTOMATIC1111 does.
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
    """A request's text embeddings: (1, tokens, dim) each; negative is None without CFG."""

    positive: torch.Tensor
    negative: torch.Tensor | None

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


def _chunks(pipe: Any, text: str) -> list[list[int]]:
    """The prompt's token ids (no start/end tokens) in chunks of CHUNK_TOKENS; at least one."""
    if not text:
        return [[]]
    # Multi-vector textual-inversion tokens expand to several ids, as in encode_prompt.
    converted = pipe.maybe_convert_prompt(text, pipe.tokenizer)
    ids: list[int] = pipe.tokenizer(
        converted, add_special_tokens=False, truncation=False, verbose=False
    ).input_ids
    chunks = [ids[i : i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)]
    return chunks or [[]]


def _encode_chunks(pipe: Any, chunks: list[list[int]], n: int, device: torch.device) -> Any:
    """Encode `chunks` (padded with empty ones to `n`) -> (1, 77 * n, dim) embeddings."""
    tokenizer = pipe.tokenizer
    length = CHUNK_TOKENS + 2
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for chunk in chunks + [[]] * (n - len(chunks)):
        ids = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
        rows.append(ids + [pad] * (length - len(ids)))
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
