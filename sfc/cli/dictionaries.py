"""``sfc dictionaries``: build and measure a model's cached dictionary set.

- ``sfc dictionaries build --model smollm2-135m`` trains TopK SAEs for the
  default scope (``attribution.model.embedded.DEFAULT_SITES``) into
  ``$SFC_CACHE/dictionaries/<model>/<site>/``; re-running skips finished sites
  and reuses a complete harvest, so an interrupted build resumes.
- ``sfc dictionaries report --model smollm2-135m --json`` prints one JSON
  object with a row per site (width, L0, variance explained, dead fraction,
  CE loss recovered) measured on held-out text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

DEFAULT_TOKENS = 200_000


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("dictionaries", help="build or report the cached dictionaries of a model")
    sub = p.add_subparsers(dest="action", required=True)
    for name, helptext in (("build", "train TopK SAEs for a model's sites"),
                           ("report", "measure the cached dictionaries on held-out text")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("--model", default="smollm2-135m", help="model id (default: smollm2-135m)")
        q.add_argument("--sites", nargs="+", default=None,
                       help="site names, e.g. resid_3 mlp_5 (default: the model's default scope)")
        q.add_argument("--device", default="cpu")
        q.set_defaults(func=run)
        if name == "build":
            # width, k and epochs default to TrainConfig's (2304, 64, 2), read when training starts.
            q.add_argument("--width", type=int, default=None, help="latents per SAE (default 2304)")
            q.add_argument("--k", type=int, default=None, help="active latents per token, TopK (default 64)")
            q.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                           help=f"corpus tokens to harvest (default {DEFAULT_TOKENS})")
            q.add_argument("--epochs", type=float, default=None, help="passes over the harvest per SAE (default 2)")
            q.add_argument("--harvest-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                           help="dtype the model runs in for the harvest (auto: bfloat16 where the "
                                "hardware has native bf16 matmuls, else float32)")
            q.add_argument("--keep-activations", action="store_true",
                           help="keep the harvested activations after a complete build")
        else:
            q.add_argument("--tokens", type=int, default=2048, help="held-out tokens (at least 2048)")
            q.add_argument("--json", action="store_true", help="print one JSON object")


def _default_sites(model_name: str, model) -> list[str]:
    if model_name == "smollm2-135m":
        from attribution.model.embedded import DEFAULT_SITES

        return list(DEFAULT_SITES)
    return [s.name for s in model.sites(kinds=("resid",))]


def run(args: argparse.Namespace) -> int:
    from attribution.model.loading import load_model
    from sfc.cli.checks import check_dictionary_args

    check_dictionary_args(args)  # before the model loads
    model = load_model(args.model, device=args.device)
    names = args.sites or _default_sites(args.model, model)
    sites = model.sites(names)  # unknown names raise one sentence listing what exists
    if args.action == "build":
        return _build(args, model, sites)
    return _report(args, model, [s.name for s in sites])


def _build(args: argparse.Namespace, model, sites) -> int:
    import torch

    from attribution.dictionaries.store import build_dictionaries
    from attribution.dictionaries.training import TrainConfig
    from sfc.cli.checks import check_training_memory

    chosen = {"width": args.width, "k": args.k, "epochs": args.epochs}
    config = TrainConfig(**{name: v for name, v in chosen.items() if v is not None}, device=args.device)
    check_training_memory(config.width, max(s.d for s in sites), args.device)
    if config.k > 64:
        print(f"note: k={config.k} gives circuits with more than 64 active features per token.", file=sys.stderr)
    start = time.time()
    dtype = None if args.harvest_dtype == "auto" else getattr(torch, args.harvest_dtype)
    folders = build_dictionaries(model, sites, config, args.tokens, keep_activations=args.keep_activations,
                                 harvest_dtype=dtype, log=lambda m: print(m, file=sys.stderr))
    print(f"{len(folders)} dictionaries ready under {next(iter(folders.values())).parent} "
          f"({time.time() - start:.0f} s).", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace, model, names: list[str]) -> int:
    from attribution.cache import dictionary_cache
    from attribution.dictionaries.formats import read_metadata
    from attribution.dictionaries.store import evaluate_dictionaries, load_cached_dictionaries

    if args.tokens < 2048:
        raise ValueError(f"--tokens {args.tokens} is too few for a stable CE estimate: use at least 2048.")
    dictionaries = load_cached_dictionaries(model.name, names, model=model)
    metadata = {n: read_metadata(dictionary_cache(model.cache_key) / n) for n in names}
    rows = evaluate_dictionaries(model, dictionaries, args.tokens, metadata=metadata)
    if args.json:
        print(json.dumps({"model": model.name, "held_out_tokens": rows[0]["tokens"] if rows else 0,
                          "sites": rows}))
    else:
        print(f"{'site':<10} {'width':>6} {'L0':>6} {'var.expl':>9} {'dead':>6} {'CE rec.':>8}")
        for r in rows:
            dead = "-" if r["dead_fraction"] is None else f"{r['dead_fraction']:.3f}"
            print(f"{r['site']:<10} {r['width']:>6} {r['l0']:>6.1f} {r['variance_explained']:>9.3f} "
                  f"{dead:>6} {r['ce_loss_recovered']:>8.3f}")
    return 0
