"""The `lumen` command: generate, models, serve, bench, demo, simulate, profile.

Bad input is reported as one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys


class UsageError(Exception):
    """A mistake in what the user asked for (exit code 2)."""


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate_cli
    return generate_cli(args)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="offline generation in one process (quick checks)")
    p.add_argument("prompt", nargs="?", default="What is the capital of France?")
    p.add_argument("--model", default="default", help="HF directory, 'default' or preset:NAME")
    p.add_argument("--draft-model", default=None, help="co-located draft for speculative decoding")
    p.add_argument("--spec-k", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--no-chat", action="store_true", help="send the prompt as raw text, not as a chat turn")
    p.add_argument("--device", default="cpu")
    p.add_argument("--deterministic", action="store_true")
    p.set_defaults(func=_cmd_generate)


def _cmd_models(args: argparse.Namespace) -> int:
    from .model.hub import default_paths, prepare_default, prepare_default_draft
    if args.action == "prepare":
        target = prepare_default(force=args.force)
        draft = prepare_default_draft(force=args.force)
        print(f"default model: {target}\ndefault draft: {draft}")
    else:
        from .model import PRESETS
        target, draft = default_paths()
        print(f"default        {target}{'' if target.exists() else '  (not prepared: lumen models prepare)'}")
        print(f"default-draft  {draft}{'' if draft.exists() else '  (not prepared)'}")
        for name, cfg in sorted(PRESETS.items()):
            print(f"preset:{name:14s} {cfg.param_count() / 1e9:.2f}B params (random weights)")
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="prepare or list models")
    p.add_argument("action", choices=["prepare", "list"])
    p.add_argument("--force", action="store_true", help="convert again even if prepared")
    p.set_defaults(func=_cmd_models)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .runtime.server import serve
    return asyncio.run(serve(args))


def _add_serve(sub) -> None:
    from .runtime.server import add_serve_arguments
    p = sub.add_parser("serve", help="serve a model on a fault-tolerant cluster of workers (OpenAI API)")
    add_serve_arguments(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_profile(args: argparse.Namespace) -> int:
    from .engine.profile import profile_cli
    return profile_cli(args)


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="measure engine step times over a grid (CSV for lumen simulate)")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="profile.csv")
    p.add_argument("--quick", action="store_true", help="a small grid")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per grid point (the median is kept)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch threads (default: LUMEN_WORKER_THREADS or 1, as a CPU worker)")
    p.add_argument("--procs", type=int, default=1,
                   help="also profile a small grid in this many processes at once (as that many workers "
                        "on one host): adds colocated_busy rows, the simulator's co-located slowdown")
    p.set_defaults(func=_cmd_profile)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lumen", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_models(sub)
    _add_serve(sub)
    from .bench.cli import add_parser as add_bench
    from .sim.cli import add_parser as add_sim
    add_bench(sub)
    add_sim(sub)
    _add_profile(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, FileNotFoundError) as exc:
        print(f"lumen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
