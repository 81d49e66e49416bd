"""`sdbot` command line: run, playground, generate, tiny-model, bench."""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image

from bot import imaging
from bot.catalog import Catalog
from bot.errors import InvalidRequest, SdbotError
from bot.inputs import (
    DEFAULT_STRENGTH,
    attachment_bytes,
    option_defaults,
    parse_loras,
    parse_size,
    picture_inputs,
)
from bot.jobs import GenerationRequest
from bot.settings import Settings, check_default_model, export_hub_token, load_settings

#: `sdbot generate -o` formats, chosen by the file name's extension.
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
BENCHMARKS = {
    "executor": "the GPU executor's figures: throughput, batching, fairness",
    "load": "the load test: many members at once through the local Discord server and the bot",
    "serve": "the Ray Serve backend: per-job overhead, 2 replicas vs 1, fairness through Serve",
    "gpu": "the GPU fast path: it/s, dtypes, compile, syncs, memory, OOM recovery (--quick: CPU)",
}


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
        "above 1, FILE is the grid of all images and FILE-1 .. FILE-N hold each image. The "
        "format follows FILE's extension: .png (parameters in a text chunk, A1111 format), "
        ".jpg/.jpeg or .webp (parameters in EXIF UserComment, as A1111 writes them).",
    )
    gen.add_argument("prompt")
    gen.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="image to write: .png, .jpg or .webp"
    )
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
    gen.add_argument(
        "--strength",
        type=float,
        default=None,
        help=f"img2img/inpaint (0.05-1; default {DEFAULT_STRENGTH['img2img']:g} for img2img, "
        f"{DEFAULT_STRENGTH['inpaint']:g} for inpaint, as in Discord)",
    )
    gen.add_argument(
        "--scheduler",
        default=None,
        help="sampler by A1111 name, e.g. 'Euler a' (default: the model's, else its own)",
    )
    gen.add_argument("--count", type=int, default=1, help="images, seeds seed..seed+N-1 (1-4)")
    gen.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME[:WEIGHT]",
        help="LoRA from SDBOT_LORA_DIR, e.g. style:0.8 (repeatable or comma-separated, as in "
        "Discord; weight 1 by default)",
    )
    gen.add_argument(
        "--size",
        default=None,
        metavar="WxH",
        help="image size, e.g. 768x512 (default: the model's native size; with --image, the "
        "picture's aspect at the model's native size, as in Discord)",
    )
    gen.add_argument("--width", type=int, default=None, help="with --height, instead of --size")
    gen.add_argument("--height", type=int, default=None, help="with --width, instead of --size")
    gen.add_argument("--steps", type=int, default=None, help="default: the model's, else 20")
    gen.add_argument("--guidance", type=float, default=None, help="default: the model's, else 7")
    gen.add_argument("--seed", type=int, default=None)
    bench = sub.add_parser(
        "bench",
        help="benchmarks: `bench executor|load|serve|gpu [...]`; no argument: executor, load",
        description="The benchmarks (tiny model on the CPU by default).\n"
        "With no BENCHMARK, both run with their defaults (options alone go to executor).\n"
        "`sdbot bench BENCHMARK --help` lists a benchmark's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="benchmarks:\n"
        + "\n".join(f"  {name:<10} {text}" for name, text in BENCHMARKS.items()),
    )
    bench.add_argument(
        "benchmark", nargs="?", choices=tuple(BENCHMARKS), metavar="BENCHMARK", help="see below"
    )
    bench.add_argument("options", nargs=argparse.REMAINDER, help="that benchmark's options")
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
    # transformers falls back to its PIL image processors without torchvision, which sdbot
    # does not need, and says so on every start.
    notices = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _NoTorchvisionNotice) for f in notices.filters):
        notices.addFilter(_NoTorchvisionNotice())


class _NoTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in str(record.msg)


def _generate(settings: Settings, args: argparse.Namespace) -> None:
    # Lazy: torch and diffusers take seconds to import, and only this command needs them.
    from bot.engine import Engine

    out, image_format = _check_output(args.output, args.count)
    catalog = Catalog.load(settings.models_file, settings.lora_dir)
    entry = catalog.resolve(args.model) if args.model else check_default_model(settings, catalog)
    mode = args.mode or ("inpaint" if args.mask else "img2img" if args.image else "txt2img")
    size = _size(args)
    strength = None
    if mode != "txt2img":
        strength = DEFAULT_STRENGTH[mode] if args.strength is None else args.strength
    # What the shell gave, then the model's own defaults, then the built-in ones.
    given: dict[str, Any] = option_defaults(
        entry, steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, strength=strength
    )
    given |= {
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "model": entry.name,
        "mode": mode,
        "count": args.count,
        "loras": parse_loras(",".join(args.lora), catalog.loras()),
    }
    if args.seed is not None:
        given["seed"] = args.seed
    if mode == "txt2img":
        if args.image or args.mask:
            raise InvalidRequest("--image and --mask are for --mode img2img or inpaint.")
        if size:
            given["width"], given["height"] = size
    else:
        if args.image is None:
            raise InvalidRequest(f"--mode {mode} needs --image FILE.")
        # The picture is decoded, sized and masked exactly as the Discord commands do it.
        inpaint = mode == "inpaint"
        picture = _decode(settings, args.image, what="image", keep_alpha=inpaint)
        mask = _decode(settings, args.mask, what="mask") if inpaint and args.mask else None
        native = entry.native_size
        given.update(picture_inputs(picture, native=native, size=size, inpaint=inpaint, mask=mask))
        given["strength"] = strength
    request = GenerationRequest(**given)

    engine = Engine.from_settings(settings, catalog)  # one model: the RAM tier stays idle
    result = engine.generate([request])[0]
    texts = [
        imaging.request_parameters(request, seed=seed, sampler=result.sampler)
        for seed in result.seeds
    ]
    singles, grid = _encode(result.images, texts, image_format)
    paths = _output_paths(out, len(singles))
    files = dict(zip(paths, [singles[0]] if grid is None else [grid, *singles], strict=True))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for path, data in files.items():
            path.write_bytes(data)
    except OSError as exc:
        failed = exc.filename or out
        raise InvalidRequest(f"Cannot write {failed}: {exc.strerror or exc}.") from None
    flagged = [i + 1 for i, nsfw in enumerate(result.nsfw) if nsfw]
    seeds = ", ".join(str(s) for s in result.seeds)
    print(f"wrote {', '.join(str(p) for p in files)} (seed {seeds}, {result.sampler})")
    if flagged:
        print(f"note: the safety checker flagged image(s) {flagged}", file=sys.stderr)


def _check_output(raw: str, count: int) -> tuple[Path, str]:
    """The file `-o` names and its format, checked before a model is loaded for it."""
    out = Path(raw).expanduser()
    if raw.endswith(("/", os.sep)) or out.is_dir():
        raise InvalidRequest(f"-o {raw} is a folder; name a file in it, e.g. {out / 'image.png'}.")
    image_format = OUTPUT_FORMATS.get(out.suffix.lower())
    if image_format is None:
        raise InvalidRequest(
            f"-o {raw}: the file name must end in .png, .jpg, .jpeg or .webp (the image format "
            "follows it)."
        )
    for path in _output_paths(out, count if 1 <= count <= 4 else 1):
        if path.is_dir():
            raise InvalidRequest(f"Cannot write {path}: it is a folder.")
        if path.exists() and not os.access(path, os.W_OK):
            raise InvalidRequest(f"Cannot write {path}: permission denied.")
    folder = out.parent  # created when missing, as long as it can be
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InvalidRequest(f"Cannot write {out}: {folder} is a file, not a folder.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidRequest(f"Cannot write {out}: the folder {folder} is not writable.")
    return out, image_format


def _output_paths(out: Path, count: int) -> list[Path]:
    """Where `count` images go: `out` alone, or the grid in `out` and each in out-1, out-2..."""
    if count == 1:
        return [out]
    return [out, *(out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count + 1))]


def _encode(
    images: Sequence[Image.Image], texts: Sequence[str], image_format: str
) -> tuple[list[bytes], bytes | None]:
    """Each image (and with several, their grid) in `image_format`, parameters included."""
    if image_format == "PNG":
        return imaging.encode_pngs(images, texts)
    pairs = zip(images, texts, strict=True)
    singles = [_encode_with_exif(image, text, image_format) for image, text in pairs]
    grid = None
    if len(images) > 1:  # labelled with the first image's parameters, as A1111 and the PNGs
        grid = _encode_with_exif(imaging.make_grid(images), texts[0], image_format)
    return singles, grid


def _encode_with_exif(image: Image.Image, parameters: str, image_format: str) -> bytes:
    """JPEG or WebP with the parameters in EXIF UserComment, laid out as A1111 writes them
    (piexif's "unicode": an 8-byte charset prefix, then UTF-16BE), so A1111 and others read it.
    """
    exif = Image.Exif()
    user_comment = b"UNICODE\0" + parameters.encode("utf-16-be")
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = user_comment
    rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")
    buffer = io.BytesIO()
    try:
        rgb.save(buffer, format=image_format, quality=95, exif=exif)
    except ValueError:  # a JPEG's EXIF holds 64 KB at most: an image without them beats none
        print("note: the parameters are too long for EXIF and were left out", file=sys.stderr)
        buffer = io.BytesIO()
        rgb.save(buffer, format=image_format, quality=95)
    return buffer.getvalue()


def _size(args: argparse.Namespace) -> tuple[int, int] | None:
    """The size asked for: --size as the Discord commands read it, or --width with --height."""
    if args.width is None and args.height is None:
        return parse_size(args.size) if args.size else None
    if args.size:
        raise InvalidRequest("Give --size WxH or --width and --height, not both.")
    if args.width is None or args.height is None:
        raise InvalidRequest(
            "--width and --height go together (or use --size WxH); with neither, the size is "
            "the model's native one, and an --image keeps its aspect."
        )
    return int(args.width), int(args.height)


def _decode(settings: Settings, path: Path, *, what: str, keep_alpha: bool = False) -> Image.Image:
    """An input file, checked and decoded under the same limits as a Discord attachment."""
    return imaging.decode_attachment(
        _read(path),
        max_bytes=attachment_bytes(settings.max_attachment_mb),
        max_pixels=settings.max_attachment_pixels,
        what=what,
        keep_alpha=keep_alpha,
    )


def _read(path: Path) -> bytes:
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
        export_hub_token(settings)
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
    """`sdbot bench [executor|load|serve|gpu] [options]`: the scheduler figures and the load test.

    Each benchmark parses its own options, so only the name is read here; `--help` and a
    name that is not a benchmark go to the `bench` parser, which lists the benchmarks.
    """
    first = argv[0] if argv else "-"
    if first not in BENCHMARKS and (first in ("-h", "--help") or not first.startswith("-")):
        _parser().parse_args(["bench", first])  # prints the help or the choices, and exits
    from bench import executor_bench, gpu_bench, load_bench, serve_bench

    if argv[:1] == ["executor"]:
        return executor_bench.main(argv[1:])
    if argv[:1] == ["load"]:
        return load_bench.main(argv[1:])
    if argv[:1] == ["serve"]:
        return serve_bench.main(argv[1:])
    if argv[:1] == ["gpu"]:
        return gpu_bench.main(argv[1:])
    return executor_bench.main(argv) | load_bench.main([])
