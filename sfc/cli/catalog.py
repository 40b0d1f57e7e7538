"""``sfc catalog``: unsupervised circuit discovery at scale (see :mod:`sfc.catalog`).

- ``sfc catalog build --model smollm2-135m --samples 2000 --clusters 50 --out DIR``
  finds behaviour samples, clusters them, builds and evaluates a circuit per
  cluster and writes ``DIR/catalog.json`` and ``DIR/index.html``; rerunning the
  same command resumes an interrupted run. ``--workers W`` runs clusters on W Ray
  actors (``pip install 'sparse-feature-circuits[distributed]'``), ``--address``
  joins a running Ray cluster (docs/catalog.md).
- ``sfc catalog view DIR`` opens ``DIR/index.html`` in the browser.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("catalog", help="unsupervised circuit discovery: a catalog of behaviours and their circuits")
    cmds = p.add_subparsers(dest="catalog_command", required=True)
    b = cmds.add_parser("build", help="build (or resume) a catalog")
    b.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), an HF id or a local folder")
    b.add_argument("--dictionaries", default=None, help="folder with one dictionary sub-folder per site")
    b.add_argument("--sites", nargs="*", default=None, help="sites to use (default: all dictionaries)")
    b.add_argument("--text", default=None,
                   help="text to sample from: a .txt file (one document per blank-line-separated block) or a "
                        ".jsonl file of {\"text\": ...}; default: the built-in corpus")
    b.add_argument("--split", choices=["train", "heldout"], default="train", help="built-in corpus split")
    b.add_argument("--samples", type=int, default=2000)
    b.add_argument("--clusters", type=int, default=50)
    b.add_argument("--loss-threshold", type=float, default=0.1, help="max loss in bits (default 0.1, as the quanta paper)")
    b.add_argument("--max-context", type=int, default=32, help="context length cap in tokens")
    b.add_argument("--min-context", type=int, default=4)
    b.add_argument("--max-per-row", type=int, default=3, help="samples per row of text at most")
    b.add_argument("--representation", choices=["gradient", "activation", "both"], default="gradient")
    b.add_argument("--metric", choices=["neg_log_prob", "logit"], default="neg_log_prob")
    b.add_argument("--method", choices=["attrib", "ig"], default="attrib")
    b.add_argument("--steps", type=int, default=5, help="integrated-gradients steps (--method ig)")
    b.add_argument("--ablation", choices=["zero", "mean"], default="zero")
    b.add_argument("--top-k", type=int, default=512, help="nodes per circuit (default 512)")
    b.add_argument("--node-threshold", type=float, default=0.0)
    b.add_argument("--edge-threshold", type=float, default=0.0)
    b.add_argument("--no-edges", action="store_true", help="nodes only")
    b.add_argument("--train", type=int, default=16, help="members a circuit is built on (at most half its cluster)")
    b.add_argument("--eval", type=int, default=16, help="held-out members a circuit is evaluated on")
    b.add_argument("--other", type=int, default=16, help="members of other clusters it is evaluated on")
    b.add_argument("--start-layer", type=int, default=None,
                   help="faithfulness ablates sites from this layer on (default: two thirds of the layers)")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--workers", type=int, default=0, help="Ray workers (0: run in this process)")
    b.add_argument("--address", default=None, help="Ray cluster to join (e.g. auto or HEAD:6379)")
    b.add_argument("--torch-threads", type=int, default=1, help="torch threads per Ray worker")
    b.add_argument("--device", default="cpu")
    b.add_argument("--out", required=True, help="output folder (rerun to resume)")
    b.set_defaults(func=run_build)
    v = cmds.add_parser("view", help="open a catalog's index page")
    v.add_argument("dir", help="catalog folder")
    v.add_argument("--no-open", action="store_true", help="print the path only")
    v.set_defaults(func=run_view)


def read_texts(path: str) -> list[str]:
    """Documents of a .txt (blocks separated by blank lines) or .jsonl (``{"text": ...}`` per line) file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"No text file at {p}: give a .txt or .jsonl file.")
    raw = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{p} line {n} is not a JSON object with a 'text' field.") from None
        return texts
    return [block for block in raw.split("\n\n") if block.strip()]


def _config(args):
    from sfc.catalog import CatalogConfig

    return CatalogConfig(
        samples=args.samples, clusters=args.clusters, loss_threshold=args.loss_threshold,
        max_context=args.max_context, min_context=args.min_context, max_per_row=args.max_per_row,
        representation=args.representation, metric=args.metric, method=args.method, steps=args.steps,
        ablation=args.ablation, top_k=args.top_k, node_threshold=args.node_threshold, edges=not args.no_edges,
        edge_threshold=args.edge_threshold, n_train=args.train, n_eval=args.eval, n_other=args.other,
        start_layer=args.start_layer, seed=args.seed, batch_size=args.batch_size,
    )


def run_build(args: argparse.Namespace) -> int:
    from sfc.catalog import NamedLoader, build_catalog

    cfg = _config(args)
    cfg.check()
    if args.workers < 0:
        raise ValueError(f"--workers must be 0 (in process) or more, got {args.workers}.")
    if args.text:
        texts, source = read_texts(args.text), str(Path(args.text).resolve())
    else:
        from attribution.dictionaries.corpus import load_corpus

        texts, source = load_corpus(args.split), f"builtin:{args.split}"
    loader = NamedLoader(args.model, args.dictionaries, tuple(args.sites) if args.sites else None, args.device)
    t0 = time.perf_counter()
    result = build_catalog(args.out, loader, cfg, texts=texts, settings={**loader.settings(), "text": source},
                           workers=args.workers, address=args.address, torch_threads=args.torch_threads)
    s = result.summary
    ratio = s["ratio_own_over_other"]
    print(f"[sfc] {s['n_clusters']} clusters of {s['n_samples']} samples in {time.perf_counter() - t0:.0f} s; "
          f"own/other faithfulness ratio median {ratio['median'] if ratio else 'n/a'}, own above other for "
          f"{s['fraction_own_above_other']} of clusters -> {result.out / 'index.html'}", file=sys.stderr)
    return 0


def run_view(args: argparse.Namespace) -> int:
    index = Path(args.dir) / "index.html"
    if not index.is_file():
        raise FileNotFoundError(f"No catalog index at {index}: build one with `sfc catalog build --out {args.dir}`.")
    print(index.resolve())
    if not args.no_open:
        import webbrowser

        webbrowser.open(index.resolve().as_uri())
    return 0
