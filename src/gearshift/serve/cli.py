"""`gearshift serve MODEL_DIR`: the OpenAI-compatible server."""

from __future__ import annotations

import argparse

from ..clitools import CliError, positive_float, positive_int

# CPU: decoding state may take this share of the memory available after the weights are loaded (the rest is for
# activations, the tokenizer, the HTTP server and everything else on the machine; CUDA's share is the engine's)
CPU_STATE_FRACTION = 0.5


def _check_port(host: str, port: int) -> None:
    """Fail in one line, before minutes of loading and gigabytes of pools, when the port is taken."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what uvicorn sets: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise CliError(f"cannot listen on {host}:{port} ({exc.strerror}): is another server running there? "
                           "pick another --port") from None  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import load_tokenizer
    from ..memory import available_bytes, human_bytes
    from ..model import Supernet
    from .engine import Engine
    from .server import create_app, serve

    _check_port(args.host, args.port)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {
        "auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
    }[args.dtype]
    presets, reserved = _served(args.only_presets)
    model = Supernet.from_pretrained(args.model, device=device, dtype=dtype)
    if presets:  # the weights of mixers no served preset uses are dropped too: room for more state
        model.thin_(presets)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files; the server needs one to read text")
    budget = None if args.state_memory_gb is None else int(args.state_memory_gb * 2**30)
    source = "--state-memory-gb"
    if budget is None and not device.startswith("cuda"):  # the CPU has no allocator limit: the kernel kills instead
        free = available_bytes(device)
        if free is not None:
            budget = int(CPU_STATE_FRACTION * free)
            source = f"{CPU_STATE_FRACTION:.0%} of the {human_bytes(free)} available"
    elif budget is None:
        source = "85% of free GPU memory"
    engine = Engine(
        model,
        max_batch=args.max_batch,
        max_context=args.max_context,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        prefill_tokens=args.prefill_tokens,
        cuda_graphs=args.cuda_graphs,
        state_memory=budget,
        placements=None if reserved else presets,
        placement_slots=reserved,
    )
    room = (
        f"{engine.full_attention_slots} of them with full-attention layers at once"
        if reserved is None
        else "room reserved for " + ", ".join(f"{n} of {p}" for p, n in reserved.items())
    )
    limit = "" if engine.state_budget is None else f" (budget {human_bytes(engine.state_budget)}: {source})"
    print(
        f"decoding state: reserved {human_bytes(engine.memory_bytes())} of pools{limit}; up to {engine.max_batch} "
        f"requests, {room} (context {engine.max_context})",
        flush=True,
    )
    app = create_app(
        engine,
        tokenizer,
        name=args.name,
        quality_floor=args.quality_floor,
        max_body_bytes=int(args.max_body_mb * 2**20),
    )
    serve(app, args.host, args.port, drain_timeout=args.drain_timeout)
    return 0


def _served(specs: list[str] | None) -> tuple[list[str] | None, dict[str, int] | None]:
    """``--only-presets`` entries as (presets, requests reserved per preset or None): ``P`` or ``P=N``, the
    latter on every entry or none."""
    if not specs:
        return None, None
    counted = [spec.rpartition("=") for spec in specs]
    if not any(sep for _, sep, _ in counted):
        return list(specs), None
    if not all(sep and n.isdigit() and int(n) > 0 for _, sep, n in counted):
        raise ValueError(f"--only-presets: give every preset a count of requests (PRESET=N, N >= 1) or none: {specs}")
    reserved: dict[str, int] = {}
    for name, _, n in counted:
        reserved[name] = reserved.get(name, 0) + int(n)
    return list(reserved), reserved


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve",
        help="OpenAI-compatible server: one model id per preset, per-request presets",
        description="OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models). Requests pick a "
        "preset by model id: NAME (the default placement), NAME:<preset>, NAME:<letters> such as gearshift:GGKG, "
        "or NAME:auto. Requests that give no temperature sample at 1.0, the OpenAI default (pass temperature 0 "
        "for greedy decoding). vLLM's flag names work too (--max-num-seqs, --max-model-len, --served-model-name).",
    )
    s.add_argument("model", help="checkpoint directory (with its tokenizer)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=_port, default=8000, help="port to listen on")
    s.add_argument(
        "--name", "--served-model-name", default="gearshift", help="model id prefix: NAME, NAME:auto, NAME:<preset>"
    )
    s.add_argument(
        "--max-batch", "--max-num-seqs", type=positive_int, default=32, help="requests decoded together at most"
    )
    s.add_argument("--max-queue", type=positive_int, default=256, help="waiting requests beyond this get 429")
    s.add_argument(
        "--max-context",
        "--max-model-len",
        type=positive_int,
        help="tokens per request, prompt + completion (default: the checkpoint's context)",
    )
    s.add_argument("--prefill-chunk", type=positive_int, default=512, help="prompt tokens per request per prefill step")
    s.add_argument(
        "--prefill-tokens",
        type=positive_int,
        help="prompt tokens (padding included) of one batched prefill forward (default: about 4 TFLOP of the model, "
        "at least 8 chunks, at most 16384)",
    )
    s.add_argument("--quality-floor", type=float, help="'auto' never picks a preset predicted below this")
    s.add_argument("--device", help="default: cuda when available, else cpu")
    s.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay decode steps from CUDA graphs per batch composition (GPU only; on by default, checked "
        "against eager decoding by benchmarks/engine_graphs.py)",
    )
    s.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: bfloat16 on GPU, float32 on CPU"
    )
    s.add_argument(
        "--state-memory-gb",
        type=positive_float,
        help="memory for all decoding state (KV, windows, recurrent state); when the pools of --max-batch requests "
        "need more, fewer requests may use full-attention layers at once (default: 85%% of free GPU memory; "
        f"on CPU {CPU_STATE_FRACTION * 100:.0f}%% of the memory available once the weights are loaded)",
    )
    s.add_argument(
        "--only-presets",
        nargs="+",
        metavar="PRESET[=N]",
        help="serve only these presets (names or placement letters): the weights of the mixers they do not use "
        "are dropped and decoding state is allocated only for the mixers they use, so more requests fit; other "
        "presets and placements get 400. With =N on every preset, each pool holds room for the N requests of "
        "every preset that uses it (not --max-batch apiece), so each request holds only its own preset's state",
    )
    s.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds that in-flight requests get to finish after SIGTERM/SIGINT; then they end with an error and "
        "the server exits (a second signal exits at once)",
    )
    s.add_argument("--max-body-mb", type=positive_float, default=8.0, help="request bodies over this get 413")
    s.set_defaults(fn=cmd_serve, extra="serve")


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"ports run from 1 to 65535, got {value}")
    return value
