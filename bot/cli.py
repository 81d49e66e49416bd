"""`sdbot` command line: run, playground, generate, tiny-model."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from bot.errors import SdbotError
from bot.settings import Settings, load_settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdbot",
        description="Stable Diffusion on your own GPU, in your Discord server. "
        "With no command: run the bot if DISCORD_TOKEN is set, else the local playground.",
    )
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="connect to Discord (needs DISCORD_TOKEN)")
    run.add_argument("--sync", action="store_true", help="sync slash commands even if unchanged")
    sub.add_parser("playground", help="local Discord-like page with the bot and the tiny model")
    gen = sub.add_parser(
        "generate",
        help="make images from the shell, through the same engine as the bot",
        description="Generate images with the bot's engine and model catalog. With --count N "
        "above 1, FILE is the grid of all images and FILE-1.png .. FILE-N.png hold each image; "
        "every PNG carries its parameters (A1111 format).",
    )
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    gen.add_argument("--negative", default="", help="negative prompt")
    gen.add_argument(
        "--model", default=None, help="catalog name or source (default: SDBOT_DEFAULT_MODEL)"
    )
    gen.add_argument(
        "--mode",
        choices=("txt2img", "img2img", "inpaint"),
        default=None,
        help="default: inpaint with --mask, img2img with --image, else txt2img",
    )
    gen.add_argument("--image", type=Path, default=None, help="input image (img2img, inpaint)")
    gen.add_argument(
        "--mask",
        type=Path,
        default=None,
        help="inpaint mask, white = repaint (default: the image's transparent pixels)",
    )
    gen.add_argument("--strength", type=float, default=0.75, help="img2img/inpaint (0.05-1)")
    gen.add_argument("--scheduler", default="default", help="sampler by A1111 name, e.g. 'Euler a'")
    gen.add_argument("--count", type=int, default=1, help="images, seeds seed..seed+N-1 (1-4)")
    gen.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME[:WEIGHT]",
        help="LoRA from SDBOT_LORA_DIR (repeatable; weight 1 by default)",
    )
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--guidance", type=float, default=7.0)
    gen.add_argument("--seed", type=int, default=None)
    sub.add_parser(
        "bench",
        help="benchmarks: `bench executor [...]`, `bench load [...]`, or both with no argument",
    )
    tiny = sub.add_parser("tiny-model", help="write the tiny random-weight test model to DIR")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--inpainting", action="store_true", help="the 9-channel inpainting variant")
    tiny.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write it as one original-layout .safetensors checkpoint (+ FILE.config/)",
    )
    return p


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("discord.gateway").setLevel(max(logging.INFO, logging.getLogger().level))


def _generate(settings: Settings, args: argparse.Namespace) -> None:
    from bot import imaging
    from bot.catalog import Catalog
    from bot.engine import Engine
    from bot.errors import InvalidRequest
    from bot.jobs import GenerationRequest, LoraSpec, snap_to_8

    catalog = Catalog.load(settings.models_file, settings.lora_dir)
    entry = catalog.resolve(args.model or settings.default_model)
    mode = args.mode or ("inpaint" if args.mask else "img2img" if args.image else "txt2img")
    given: dict[str, object] = {
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "model": entry.name,
        "steps": args.steps,
        "guidance": args.guidance,
        "mode": mode,
        "scheduler": args.scheduler,
        "count": args.count,
        "strength": args.strength,
        "loras": tuple(_lora_spec(text, LoraSpec) for text in args.lora),
    }
    if args.seed is not None:
        given["seed"] = args.seed
    width, height = args.width, args.height
    if mode == "txt2img":
        if args.image or args.mask:
            raise InvalidRequest("--image and --mask are for --mode img2img or inpaint.")
    else:
        if args.image is None:
            raise InvalidRequest(f"--mode {mode} needs --image FILE.")
        max_bytes = int(settings.max_attachment_mb * 1_000_000)
        max_pixels = settings.max_attachment_pixels
        picture = imaging.decode_attachment(
            _read(args.image),
            max_bytes=max_bytes,
            max_pixels=max_pixels,
            what="image",
            keep_alpha=mode == "inpaint",
        )
        if width is None and height is None:
            width, height = imaging.fit_size(
                picture.width, picture.height, max_side=entry.native_size
            )
        elif width is None or height is None:
            # One side given: the other follows the picture's aspect ratio.
            side = width or height or entry.native_size
            long_side = round(side * max(picture.size) / picture.size[0 if width else 1])
            width, height = imaging.fit_size(picture.width, picture.height, max_side=long_side)
        size = (snap_to_8(width), snap_to_8(height))
        given["init_image"] = picture.convert("RGB").resize(size, imaging.LANCZOS)
        if mode == "inpaint":
            mask = None
            if args.mask is not None:
                mask = imaging.decode_attachment(
                    _read(args.mask), max_bytes=max_bytes, max_pixels=max_pixels, what="mask"
                )
            given["mask_image"] = imaging.prepare_mask(
                picture if mask is None else None, mask, size
            )
        width, height = size
    given["width"] = width or entry.native_size
    given["height"] = height or entry.native_size
    request = GenerationRequest(**given)  # type: ignore[arg-type]

    engine = Engine(
        device=settings.device,
        dtype=settings.dtype,
        cache_dir=settings.cache_dir,
        catalog=catalog,
    )
    result = engine.generate([request])[0]
    texts = [
        imaging.request_parameters(request, seed=seed, sampler=result.sampler)
        for seed in result.seeds
    ]
    out: Path = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if len(result.images) == 1:
        out.write_bytes(imaging.encode_png(result.images[0], texts[0]))
        written.append(out)
    else:
        # A1111 labels a grid with its first image's parameters.
        out.write_bytes(imaging.encode_png(imaging.make_grid(result.images), texts[0]))
        written.append(out)
        for i, (image, text) in enumerate(zip(result.images, texts, strict=True), start=1):
            path = out.with_name(f"{out.stem}-{i}.png")
            path.write_bytes(imaging.encode_png(image, text))
            written.append(path)
    flagged = [i + 1 for i, nsfw in enumerate(result.nsfw) if nsfw]
    seeds = ", ".join(str(s) for s in result.seeds)
    print(f"wrote {', '.join(str(p) for p in written)} (seed {seeds}, {result.sampler})")
    if flagged:
        print(f"note: the safety checker flagged image(s) {flagged}", file=sys.stderr)


def _lora_spec(text: str, spec: type[Any]) -> Any:
    from bot.errors import InvalidRequest

    name, sep, weight = text.rpartition(":")
    if not sep:
        return spec(text, 1.0)
    try:
        return spec(name, float(weight))
    except ValueError:
        raise InvalidRequest(f"--lora {text!r}: the weight after ':' must be a number.") from None


def _read(path: Path) -> bytes:
    from bot.errors import InvalidRequest

    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"Cannot read {path}: {exc.strerror or exc}.") from None


def _tiny_model(args: argparse.Namespace) -> None:
    from bot.tiny_model import write_config_folder, write_single_file, write_tiny_model

    path = write_tiny_model(args.dir, inpainting=args.inpainting)
    print(f"wrote the tiny model to {path}")
    if args.checkpoint is not None:
        checkpoint = write_single_file(path, args.checkpoint)
        config = write_config_folder(path, checkpoint.with_name(checkpoint.name + ".config"))
        print(f"wrote the single-file checkpoint {checkpoint} and its config folder {config}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
        _setup_logging(settings)
        command = args.command or ("run" if settings.token else "playground")
        if command == "run":
            if not settings.token:
                print(
                    "sdbot: DISCORD_TOKEN is not set. Put your bot token in .env "
                    "(see .env.example), or try everything locally with `sdbot playground`.",
                    file=sys.stderr,
                )
                return 2
            from bot.runner import run_bot

            asyncio.run(run_bot(settings, sync=getattr(args, "sync", False)))
        elif command == "playground":
            from bot.runner import run_playground

            asyncio.run(run_playground(settings))
        elif command == "generate":
            _generate(settings, args)
        elif command == "tiny-model":
            _tiny_model(args)
    except SdbotError as exc:
        print(f"sdbot: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _bench(argv: list[str]) -> int:
    """`sdbot bench [executor|load] [options]`: the scheduler figures and the load test."""
    from bench import executor_bench, load_bench

    if argv[:1] == ["executor"]:
        return executor_bench.main(argv[1:])
    if argv[:1] == ["load"]:
        return load_bench.main(argv[1:])
    return executor_bench.main(argv) | load_bench.main([])
