"""`sdbot` command line: run, playground, generate, tiny-model."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

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
    gen = sub.add_parser("generate", help="make one image from the shell")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    gen.add_argument("--negative", default="")
    gen.add_argument("--model", default=None, help="model source (default: SDBOT_DEFAULT_MODEL)")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--guidance", type=float, default=7.0)
    gen.add_argument("--seed", type=int, default=None)
    tiny = sub.add_parser("tiny-model", help="write the tiny random-weight test model to DIR")
    tiny.add_argument("dir", type=Path)
    return p


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("discord.gateway").setLevel(max(logging.INFO, logging.getLogger().level))


def _generate(settings: Settings, args: argparse.Namespace) -> None:
    from bot.engine import Engine
    from bot.imaging import encode_png, format_parameters, sampler_name
    from bot.jobs import GenerationRequest
    from bot.models import native_size

    model = args.model or settings.default_model
    size = native_size(model)
    extra = {} if args.seed is None else {"seed": args.seed}
    req = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative,
        model=model,
        width=args.width or size,
        height=args.height or size,
        steps=args.steps,
        guidance=args.guidance,
        **extra,
    )
    engine = Engine(device=settings.device, dtype=settings.dtype, cache_dir=settings.cache_dir)
    pipe = engine.load(model)
    image = engine.txt2img(req)[0]
    params = format_parameters(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        steps=req.steps,
        sampler=sampler_name(type(pipe.scheduler).__name__),
        guidance=req.guidance,
        seed=req.seed,
        width=req.width,
        height=req.height,
        model=req.model,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(encode_png(image, params))
    print(f"wrote {args.output} (seed {req.seed})")


def main(argv: list[str] | None = None) -> int:
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
            from bot.tiny_model import write_tiny_model

            path = write_tiny_model(args.dir)
            print(f"wrote the tiny model to {path}")
    except SdbotError as exc:
        print(f"sdbot: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
