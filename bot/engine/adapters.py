"""LoRAs and textual-inversion embeddings on a loaded model.

LoRAs are peft adapters named by the engine; up to MAX_CACHED_LORAS stay loaded (inactive)
per model, reloaded when their file changes, and are active only during the call that asked
for them. Embeddings are loaded the first time a prompt names one (by file name) and then
stay: a prompt that does not name them is unaffected. On SDXL models LoRAs reach both text
encoders (diffusers' load_lora_weights), and an embedding's `clip_l` and `clip_g` vectors go
into the first and second encoder.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from bot.catalog import Catalog
from bot.engine.loading import LoadedModel
from bot.engine.sources import short_error
from bot.errors import InvalidRequest
from bot.jobs import GenerationRequest, LoraSpec

log = logging.getLogger(__name__)

#: LoRAs stay loaded (as inactive adapters) per model, so a popular one is not re-read each job.
MAX_CACHED_LORAS = 8


class Adapters:
    """The LoRA and embedding files of `catalog`, applied to loaded models."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        # Adapter names unique for the engine's lifetime, so a replaced file never collides.
        self._ids = itertools.count(1)

    @contextlib.contextmanager
    def applied(self, loaded: LoadedModel, loras: tuple[LoraSpec, ...]) -> Iterator[None]:
        """`loras` active (with their weights) inside the block; the plain model after it."""
        try:
            self._apply_loras(loaded, loras)
            yield
        finally:
            if loras:
                # The next request without LoRAs must get the plain model.
                with contextlib.suppress(Exception):
                    loaded.base.disable_lora()

    def _apply_loras(self, loaded: LoadedModel, loras: tuple[LoraSpec, ...]) -> None:
        pipe = loaded.base
        if not loras:
            if loaded.loras:
                pipe.disable_lora()
            return
        adapters: list[str] = []
        for spec in loras:
            path = self.catalog.lora_path(spec.name)
            try:
                stat = path.stat()
            except OSError as exc:  # removed (or made unreadable) since it was listed
                log.warning("LoRA %s: %s", spec.name, exc)
                raise InvalidRequest(
                    f"The LoRA {spec.name!r} cannot be read on this bot right now; the log "
                    "says why."
                ) from exc
            stamp = (stat.st_mtime_ns, stat.st_size)
            cached = loaded.loras.get(spec.name)
            if cached is not None and cached[1] != stamp:
                # The file was replaced: drop the old weights.
                self._delete_adapter(loaded, spec.name)
                cached = None
            if cached is None:
                adapter = f"sdbot_lora_{next(self._ids)}"
                try:
                    with _quiet_peft():
                        pipe.load_lora_weights(str(path), adapter_name=adapter)
                except Exception as exc:
                    log.warning(
                        "LoRA %s (%s) failed to load: %s", spec.name, path, short_error(exc, 400)
                    )
                    with contextlib.suppress(Exception), _quiet_peft():
                        pipe.delete_adapters([adapter])
                    raise InvalidRequest(
                        f"The LoRA {spec.name!r} does not fit model "
                        f"{loaded.entry.public_name!r} (it was probably made for another base "
                        "model). Pick another LoRA or model."
                    ) from exc
                cached = (adapter, stamp)
            loaded.loras[spec.name] = cached
            loaded.loras.move_to_end(spec.name)
            adapters.append(cached[0])
        wanted = {spec.name for spec in loras}
        for name in list(loaded.loras):
            if len(loaded.loras) <= MAX_CACHED_LORAS:
                break
            if name not in wanted:
                self._delete_adapter(loaded, name)
        pipe.set_adapters(adapters, adapter_weights=[float(spec.weight) for spec in loras])
        pipe.enable_lora()

    def _delete_adapter(self, loaded: LoadedModel, name: str) -> None:
        cached = loaded.loras.pop(name, None)
        if cached is not None:
            with contextlib.suppress(Exception), _quiet_peft():
                loaded.base.delete_adapters([cached[0]])

    def load_embeddings(self, loaded: LoadedModel, requests: Sequence[GenerationRequest]) -> None:
        """Load the textual-inversion embeddings the prompts mention (by file name), once."""
        available = [n for n in self.catalog.embeddings() if n not in loaded.embeddings]
        if not available:
            return
        text = "\n".join(f"{r.prompt}\n{r.negative_prompt}" for r in requests)
        for name in available:
            if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text):
                continue
            # Tried once per model: a failure is logged and the word stays plain text.
            loaded.embeddings.add(name)
            path = self.catalog.embedding_path(name)
            try:
                if loaded.family == "sdxl":
                    _load_sdxl_embedding(loaded.base, path, name)
                else:
                    loaded.base.load_textual_inversion(str(path), token=name)
                log.info("loaded embedding %s into %s", name, loaded.entry.name)
            except Exception as exc:
                log.warning(
                    "embedding %s does not fit model %s: %s",
                    name,
                    loaded.entry.name,
                    short_error(exc, 300),
                )


def _load_sdxl_embedding(pipe: Any, path: Path, token: str) -> None:
    """An SDXL embedding holds vectors for each text encoder: `clip_l` for the first and
    `clip_g` for the second (A1111's and diffusers' layout); each goes into its encoder and
    tokenizer. Checked before either is loaded, so a misfit leaves both untouched."""
    if path.suffix.lower() == ".safetensors":
        state: Any = load_file(str(path))
    else:  # .pt/.bin: tensors only, never pickled code
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    pairs = (
        (pipe.text_encoder, pipe.tokenizer, "clip_l"),
        (pipe.text_encoder_2, pipe.tokenizer_2, "clip_g"),
    )
    for encoder, _, key in pairs:
        vectors = state.get(key) if isinstance(state, dict) else None
        width = int(encoder.config.hidden_size)
        if not isinstance(vectors, torch.Tensor) or vectors.shape[-1] != width:
            raise ValueError(f"no {key} vectors {width} wide: not an embedding for this SDXL model")
    for encoder, tokenizer, key in pairs:
        pipe.load_textual_inversion(
            state[key], token=token, text_encoder=encoder, tokenizer=tokenizer
        )


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """Several adapters per model and deleting inactive ones are the design, not mistakes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Already found a `peft_config`")
        warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
        yield
