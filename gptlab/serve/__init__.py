"""Serving: an OpenAI-compatible HTTP server with continuous batching (`app`, `scheduler`, `protocol`)
and a self-contained web chat page (`static/index.html`).

This module only registers `gptlab serve`; FastAPI and uvicorn are imported when the command runs, so
other commands do not pay for importing them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from gptlab.common import DTYPE_NAMES, GptlabError, get_logger
from gptlab.infer.engine import Engine
from gptlab.quant import add_quantize_arg

log = get_logger("serve")


# ---- command line ----------------------------------------------------------------------------------------
def _cmd_serve(args: argparse.Namespace) -> None:
    import torch

    from gptlab.checkpoint import load_for_inference
    from gptlab.common import torch_device, torch_dtype
    from gptlab.infer.generation_config import read_generation_config
    from gptlab.serve.app import ServeConfig, create_app, run_server

    model, tokenizer = load_for_inference(args.model, device=torch_device(args.device), dtype=torch_dtype(args.dtype),
                                          quantize=args.quantize)
    model.eval()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_batch < 1 or args.max_queue < 0 or args.prefill_chunk_tokens < 0 or args.prefix_cache_mb < 0:
        raise GptlabError("--max-batch must be >= 1, --max-queue, --prefill-chunk-tokens and --prefix-cache-mb >= 0")
    engine = Engine(model, tokenizer, strict_context=True, prefix_cache=not args.no_prefix_cache,
                    prefix_cache_mb=args.prefix_cache_mb)
    names = args.served_model_name or [Path(args.model).resolve().name]
    config = ServeConfig(model_name=names[0], aliases=tuple(names[1:]),
                         generation_config=read_generation_config(args.model),
                         api_key=args.api_key or os.environ.get("GPTLAB_API_KEY") or None,
                         max_batch=args.max_batch, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                         max_tokens_limit=args.max_tokens_limit, prefill_chunk_tokens=args.prefill_chunk_tokens or None,
                         rag_index=args.rag_index, embedder=args.embedder)
    app = create_app(engine, config)
    log.info("listening on http://%s:%d (model id %s%s)", args.host, args.port, ", ".join(map(repr, names)),
             ", API key required" if config.api_key else "")
    run_server(app, args.host, args.port, shutdown_timeout=args.shutdown_timeout, log_level=args.log_level)


def register(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a web chat page")
    s.add_argument("--model", required=True, help="model directory (gptlab.json + model.safetensors + tokenizer.json)")
    s.add_argument("--served-model-name", "--model-name", nargs="+", default=None, metavar="NAME",
                   help="model id(s) clients may send, as in vLLM; responses carry the first "
                        "(default: the model directory's name)")
    s.add_argument("--host", default="127.0.0.1", help="(default: %(default)s; 0.0.0.0 to listen on all interfaces)")
    s.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $GPTLAB_API_KEY)")
    s.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    s.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    add_quantize_arg(s)
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    s.add_argument("--max-batch", type=int, default=32, help="rows decoded together (default: %(default)s)")
    s.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a batch slot before new ones get 429 (default: %(default)s)")
    s.add_argument("--prefill-chunk-tokens", type=int, default=128,
                   help="prompt tokens prefilled per decode step while other requests stream, so a long prompt "
                        "does not stall them (0: whole prompts at once; default: %(default)s)")
    s.add_argument("--no-prefix-cache", action="store_true",
                   help="recompute every prompt from scratch instead of reusing the keys/values of prompt prefixes "
                        "seen before (automatic prefix caching, on by default; outputs are the same either way)")
    s.add_argument("--prefix-cache-mb", type=float, default=256,
                   help="memory for cached prefixes; least recently used blocks are evicted beyond it "
                        "(default: %(default)s)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="(default: %(default)s)")
    s.add_argument("--max-tokens-limit", type=int, default=None,
                   help="largest max_tokens accepted (default: the context window)")
    s.add_argument("--rag-index", default=None, metavar="DIR",
                   help="a `gptlab rag index` directory: adds POST /v1/embeddings (its embedder) and retrieval for "
                        'chat requests with "rag": true or {"k", "retriever", "source", "min_similarity"}')
    s.add_argument("--embedder", default=None,
                   help="POST /v1/embeddings without an index: a sentence-transformers folder or registry name")
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests get to finish on SIGTERM (default: %(default)s)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=_cmd_serve)
