"""The catalog job: unsupervised circuit discovery at scale (paper §5).

:func:`build_catalog` finds behaviours with no human in the loop and a circuit
for each, writing everything under one output folder as it goes::

    DIR/settings.json                 the settings the folder was built with
    DIR/samples/NNNNN.json            behaviour samples, one shard per block of text rows
    DIR/reps/NNNNN.npy                their representations (float32 [n_shard, Σ F])
    DIR/clusters.json                 cluster labels and members
    DIR/clusters/CCC/circuit.json     each cluster's circuit (sfc-circuit format)
    DIR/clusters/CCC/circuit.html     its page in the viewer
    DIR/clusters/CCC/result.json      its evaluation and the samples it was built/evaluated on
    DIR/catalog.json                  per cluster: id, size, members, faithfulness_own/_other, paths
    DIR/index.html                    the offline index of clusters (search, sort)
    DIR/faithfulness.html             own vs other-cluster faithfulness, one point per cluster
    DIR/run.json                      timings and where the clusters ran (not part of the outputs)

Stages (:mod:`circuits.quanta` has the definitions):

1. samples: text rows in shards of ``shard_rows``; each shard's samples and
   representations are written before the next shard is read;
2. clusters: the angular affinity of the representations, spectral clustering;
3. one circuit per cluster: node effects of ``-log p(answer)`` (or the answer
   logit) with zero or mean ablation and ``sum`` aggregation, so one node is one
   feature; the ``top_k`` nodes; edges between them; the graph builder;
4. evaluation: faithfulness (SPEC §5) of each circuit on held-out members of
   its cluster (``faithfulness_own``) and on members of other clusters
   (``faithfulness_other``).

Every file is written atomically, and every stage skips what is already on disk,
so an interrupted run resumes where it stopped; a resumed run whose settings differ
from ``settings.json`` is refused, naming the setting. Clusters are independent
jobs: in process, or on Ray actors (:func:`run_jobs`), each loading the model and
dictionaries once. Workers get each job's token ids and send back the circuit as
JSON; only the driver writes, so Ray nodes need no shared disk, and the driver
holds one cluster's results at a time.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ablation.config import AblationConfig
from ablation.evaluate import faithfulness
from attribution.cache import atomic_write_bytes, atomic_write_text
from attribution.dictionaries.kinds import Dictionary
from attribution.edges_summed import summed_edge_effects
from attribution.effects import node_effects
from attribution.metrics import neg_log_prob
from attribution.model.wrapper import SFCModel
from circuits.build import build_circuit, circuit_masks
from circuits.graph import METRIC_ID, Circuit
from circuits.quanta import (
    REPRESENTATIONS,
    Sample,
    affinity_from_blocks,
    answer_logit,
    cluster,
    pad_batch,
    represent,
    select_samples,
)

CatalogMetric = Literal["neg_log_prob", "logit"]
Loader = Callable[[], tuple[SFCModel, Mapping[str, Dictionary]]]


@dataclass(frozen=True)
class CatalogConfig:
    """Options of :func:`build_catalog` (the CLI's flags). All of them are stored in
    ``settings.json`` and must match for a run to resume.

    - ``samples``, ``clusters``: how many behaviour samples and clusters;
    - ``loss_threshold``: a sample passes when ``-log2 p(answer) <`` this (bits);
    - ``max_context``, ``min_context``: context length cap and minimum (tokens);
    - ``max_per_row``: at most this many samples per text row;
    - ``representation``: ``gradient``, ``activation`` or ``both`` (:mod:`circuits.quanta`);
    - ``metric``: ``neg_log_prob`` (``m = -log p(answer)``) or ``logit`` (``m = logit(answer)``);
    - ``method``: node effects by ``attrib`` (Eq. 3) or ``ig`` (Eq. 4, ``steps`` points);
    - ``ablation``: ``zero`` or ``mean``, for node effects and for faithfulness;
    - ``top_k``, ``node_threshold``: a circuit keeps the ``top_k`` nodes with
      ``|effect| > node_threshold``; ``edges`` and ``edge_threshold`` likewise for edges;
    - ``n_train``: members a circuit is built on (at most half of its cluster);
      ``n_eval``: held-out members it is evaluated on; ``n_other``: members of
      other clusters it is also evaluated on;
    - ``start_layer``: faithfulness ablates sites from this layer on (``None``: two
      thirds of the layers; the paper uses one third, but with residual-stream
      dictionaries only, circuits of ``top_k`` summed nodes keep too little of the
      stream for own and other faithfulness to differ);
    - ``shard_rows``: text rows per sample shard; ``batch_size``: rows per forward pass.
    """

    samples: int = 2000
    clusters: int = 50
    loss_threshold: float = 0.1
    max_context: int = 32
    min_context: int = 4
    max_per_row: int = 3
    representation: str = "gradient"
    metric: CatalogMetric = "neg_log_prob"
    method: Literal["attrib", "ig"] = "attrib"
    steps: int = 5
    ablation: Literal["zero", "mean"] = "zero"
    top_k: int = 512
    node_threshold: float = 0.0
    edges: bool = True
    edge_threshold: float = 0.0
    n_train: int = 16
    n_eval: int = 16
    n_other: int = 16
    start_layer: int | None = None
    seed: int = 0
    shard_rows: int = 256
    batch_size: int = 16

    def check(self) -> None:
        """Raise one clear sentence for an option out of range (no model needed)."""
        ints = {"samples": 1, "clusters": 1, "min_context": 1, "max_per_row": 1, "steps": 1, "top_k": 1,
                "n_train": 1, "n_eval": 1, "n_other": 1, "shard_rows": 1, "batch_size": 1}
        for name, low in ints.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if self.clusters > self.samples:
            raise ValueError(
                f"{self.clusters} clusters were asked for but only {self.samples} samples: ask for at most "
                f"{self.samples} clusters, or for more samples."
            )
        if self.max_context < self.min_context:
            raise ValueError(f"max_context ({self.max_context}) must be at least min_context ({self.min_context}).")
        if not (0 < self.loss_threshold < float("inf")):
            raise ValueError(f"loss_threshold must be a positive number of bits, got {self.loss_threshold!r}.")
        for name in ("node_threshold", "edge_threshold"):
            value = getattr(self, name)
            if not (0 <= value < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        choices = {"representation": REPRESENTATIONS, "metric": ("neg_log_prob", "logit"),
                   "method": ("attrib", "ig"), "ablation": ("zero", "mean")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Unknown {name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}.")


# --------------------------------------------------------------------------- settings


def check_settings(out: Path, settings: Mapping) -> None:
    """Refuse to resume ``out`` if it was built with other settings (naming the first that differs)."""
    path = out / "settings.json"
    if not path.exists():
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg}): delete the folder or choose another --out.") from None
    for key in sorted(set(stored) | set(settings)):
        if stored.get(key) != settings.get(key):
            raise ValueError(
                f"{out} holds a catalog built with {key}={stored.get(key)!r}, but this run asks for "
                f"{key}={settings.get(key)!r}: rerun with the same settings to resume, or choose another --out."
            )


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _load_npy(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


# --------------------------------------------------------------------------- stage 1: samples


def token_rows(tokenizer, texts: Sequence[str], row_len: int) -> Iterator[list[int]]:
    """Rows of ``row_len`` token ids packed from ``texts`` (lazily)."""
    from circuits.quanta import pack_rows

    return pack_rows(tokenizer, texts, row_len)


def _shards(rows: Iterator[Sequence[int]], shard_rows: int) -> Iterator[torch.Tensor]:
    buf: list[Sequence[int]] = []
    for row in rows:
        buf.append(row)
        if len(buf) == shard_rows:
            yield torch.tensor(buf, dtype=torch.long)
            buf = []
    if buf:
        yield torch.tensor(buf, dtype=torch.long)


def collect_samples(
    out: Path, model: SFCModel, dictionaries: Mapping[str, Dictionary], rows: Iterator[Sequence[int]],
    cfg: CatalogConfig, progress: bool = True,
) -> int:
    """Stage 1: write sample shards and their representations until ``cfg.samples`` samples;
    shards already on disk are reused. Returns the number of samples."""
    (out / "samples").mkdir(parents=True, exist_ok=True)
    total, n_rows = 0, 0
    bar = tqdm(total=cfg.samples, desc="samples", unit="sample", disable=not progress)
    for k, shard in enumerate(_shards(rows, cfg.shard_rows)):
        sample_path, rep_path = out / "samples" / f"{k:05d}.json", out / "reps" / f"{k:05d}.npy"
        if sample_path.exists() and rep_path.exists():
            n = len(json.loads(sample_path.read_text(encoding="utf-8")))
        else:
            found = select_samples(model, shard, first_row=n_rows, first_id=total,
                                   loss_threshold=cfg.loss_threshold, min_context=cfg.min_context,
                                   max_per_row=cfg.max_per_row, batch_size=cfg.batch_size)
            found = found[: cfg.samples - total]
            reps = represent(model, dictionaries, found, cfg.representation, batch_size=cfg.batch_size)
            if not found:
                reps = np.zeros((0, sum(d.width for d in dictionaries.values())), dtype=np.float32)
            _save_npy(rep_path, reps.astype(np.float32))  # representations first: a shard counts once both exist
            atomic_write_bytes(sample_path, _json([s.to_json() for s in found]))
            n = len(found)
        total += n
        n_rows += len(shard)
        bar.update(n)
        if total >= cfg.samples:
            break
    bar.close()
    if total == 0:
        raise ValueError(
            f"No sample passed the loss threshold of {cfg.loss_threshold} bits in the {n_rows} rows of text "
            "read: raise --loss-threshold, or give more (or more predictable) text."
        )
    if total < cfg.clusters:
        raise ValueError(
            f"Only {total} samples passed the loss threshold, fewer than the {cfg.clusters} clusters asked for: "
            "ask for fewer clusters, raise --loss-threshold, or give more text."
        )
    if total < cfg.samples:
        print(f"[sfc] the text ran out: {total} samples instead of {cfg.samples}", file=sys.stderr)
    return total


def sample_shards(out: Path) -> list[Path]:
    return sorted((out / "samples").glob("[0-9]*.json"))


def load_samples(out: Path) -> list[Sample]:
    """Every sample of ``out``, in id order."""
    return [Sample.from_json(d) for p in sample_shards(out) for d in json.loads(p.read_text(encoding="utf-8"))]


# --------------------------------------------------------------------------- stage 2: clusters


def cluster_samples(out: Path, cfg: CatalogConfig, n_samples: int) -> list[list[int]]:
    """Stage 2: cluster members (sample ids), from ``clusters.json`` if it is there."""
    path = out / "clusters.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))["members"]
    shards = sample_shards(out)
    reps = [out / "reps" / (p.stem + ".npy") for p in shards]
    affinity = affinity_from_blocks(len(reps), lambda i: _load_npy(reps[i]))
    if affinity.shape[0] != n_samples:
        raise ValueError(f"{out} holds {affinity.shape[0]} representations for {n_samples} samples: "
                         "the folder is damaged; delete reps/ and samples/ to rebuild them.")
    labels = cluster(affinity, cfg.clusters, cfg.seed)
    members = [np.flatnonzero(labels == c).tolist() for c in range(cfg.clusters)]
    atomic_write_bytes(path, _json({"labels": labels.tolist(), "members": members}))
    return members


# --------------------------------------------------------------------------- stage 3: one circuit per cluster


@dataclass
class ClusterJob:
    """What a worker needs for one cluster: token ids and answers, no file paths."""

    cluster: int
    train: list[Sample]
    own: list[Sample]
    other: list[Sample]


def make_job(cid: int, members: list[list[int]], samples: Sequence[Sample], cfg: CatalogConfig) -> ClusterJob:
    """Split cluster ``cid``: a seeded shuffle of its members gives the training members
    (``min(n_train, ceil(size / 2))``) and then up to ``n_eval`` held-out ones; up to
    ``n_other`` members of other clusters are drawn with the same seed."""
    rng = np.random.default_rng([cfg.seed, cid])
    own = [members[cid][i] for i in rng.permutation(len(members[cid]))]
    n_train = min(cfg.n_train, math.ceil(len(own) / 2))
    others = [m for c, ms in enumerate(members) if c != cid for m in ms]
    other = [others[i] for i in rng.permutation(len(others))[: cfg.n_other]]
    return ClusterJob(cid, [samples[i] for i in own[:n_train]],
                      [samples[i] for i in own[n_train:n_train + cfg.n_eval]], [samples[i] for i in other])


class CatalogWorker:
    """Builds and evaluates one cluster's circuit at a time. On Ray it is an actor that
    loads the model and dictionaries once (``loader()``); in process it wraps the
    driver's own."""

    def __init__(self, loader: Loader | None, cfg: CatalogConfig, torch_threads: int | None = None,
                 loaded: tuple[SFCModel, Mapping[str, Dictionary]] | None = None) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.model, self.dictionaries = loaded if loaded is not None else loader()
        self.cfg = cfg
        self.ids = dict(getattr(self.dictionaries, "ids", {}) or {})

    def _metric(self, samples: list[Sample]):
        answers = torch.tensor([s.answer for s in samples])
        return neg_log_prob(answers) if self.cfg.metric == "neg_log_prob" else answer_logit(answers)

    def _faithfulness(self, circuit: Circuit, samples: list[Sample]) -> float | None:
        if not samples:
            return None
        model, cfg = self.model, self.cfg
        batch = pad_batch([s.tokens for s in samples], device=model.device)
        widths = {name: d.width for name, d in self.dictionaries.items()}
        masks = circuit_masks(circuit, widths, None)
        start = cfg.start_layer if cfg.start_layer is not None else 2 * model.config.num_hidden_layers // 3
        try:
            res = faithfulness(model, batch, dict(self.dictionaries), masks, self._metric(samples),
                               config=AblationConfig(kind=cfg.ablation, start_layer=start))
        except ValueError as exc:  # m(M) = m(∅): faithfulness undefined on these samples
            print(f"[sfc] faithfulness undefined: {exc}", file=sys.stderr)
            return None
        return float(res.faithfulness)

    def run(self, job: ClusterJob) -> dict:
        """The circuit (JSON dict) and its evaluation for one cluster."""
        t0 = time.perf_counter()
        model, cfg = self.model, self.cfg
        dicts = dict(self.dictionaries)
        sites = [s for s in model.all_sites() if s.name in dicts]
        batch = pad_batch([s.tokens for s in job.train], device=model.device)
        metric = self._metric(job.train)
        effects = node_effects(model, dicts, batch, None, metric, sites=sites, method=cfg.method, steps=cfg.steps,
                               ablation=cfg.ablation, metric_positions="last", progress=False)
        edges = None
        if cfg.edges:
            edges = summed_edge_effects(model, dicts, batch, effects, metric,
                                        top_k_nodes(effects, cfg.top_k, cfg.node_threshold))
        circuit = build_circuit(
            effects, edges, model=model, aggregation="sum", node_threshold=cfg.node_threshold,
            edge_threshold=cfg.edge_threshold, top_k=cfg.top_k, dictionaries=self.ids,
            task=f"cluster {job.cluster}", prune=cfg.edges,
            extra={"cluster": job.cluster, "metric": cfg.metric, "ablation": cfg.ablation,
                   "train_samples": [s.id for s in job.train]},
        )
        t1 = time.perf_counter()
        own, other = self._faithfulness(circuit, job.own), self._faithfulness(circuit, job.other)
        t2 = time.perf_counter()
        return {"cluster": job.cluster, "circuit": circuit.to_json_dict(),
                "faithfulness_own": own, "faithfulness_other": other,
                "train": [s.id for s in job.train], "held_out": [s.id for s in job.own],
                "other": [s.id for s in job.other],
                "timings": {"circuit_s": round(t1 - t0, 3), "evaluate_s": round(t2 - t1, 3)}}


def top_k_nodes(effects, top_k: int, threshold: float) -> dict[str, torch.Tensor]:
    """Node indices per site (``F`` = the error node) of the ``top_k`` nodes by ``|summed effect|``
    above ``threshold``: the nodes :func:`build_circuit` keeps, which get incoming edges."""
    feats, errs = effects.aggregate("sum")
    scores = []
    for name in feats:
        agg = torch.cat([feats[name], errs[name][None]])
        for j in (agg.abs() > threshold).nonzero()[:, 0].tolist():
            scores.append((-abs(float(agg[j])), name, j))
    chosen = sorted(scores)[:top_k]
    return {name: torch.tensor([j for _, site, j in chosen if site == name], dtype=torch.long) for name in feats}


def run_jobs(
    jobs: Iterator[ClusterJob], n_jobs: int, worker_factory: Callable[[], CatalogWorker], loader: Loader,
    cfg: CatalogConfig, *, workers: int = 0, address: str | None = None, torch_threads: int = 1,
    progress: bool = True,
) -> Iterator[dict]:
    """Run cluster jobs and yield their results as they finish.

    ``workers=0`` runs them in this process (``worker_factory()``); ``workers >= 1``
    starts that many Ray actors (``ray.init(address=address)``: ``None`` starts a local
    Ray instance with ``workers`` CPUs; ``"auto"`` or ``"HOST:6379"`` joins a running
    cluster), each with one CPU, one GPU where the cluster has GPUs, and
    ``torch_threads`` torch threads; an ``ActorPool`` hands each idle actor the next job.
    """
    bar = tqdm(total=n_jobs, desc="clusters", unit="cluster", disable=not progress)
    if workers <= 0:
        worker = worker_factory()
        for job in jobs:
            yield worker.run(job)
            bar.update(1)
        bar.close()
        return
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise ValueError(
            "--workers needs Ray: install it with `pip install 'sparse-feature-circuits[distributed]'`, "
            "or drop --workers to run in this process."
        ) from None
    started = False
    if not ray.is_initialized():
        kwargs: dict = {"address": address, "include_dashboard": False, "log_to_driver": False}
        if address is None:
            import sfc

            root = str(Path(sfc.__file__).resolve().parents[1])  # workers import this very code
            path = os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
            kwargs |= {"num_cpus": workers, "runtime_env": {"env_vars": {"PYTHONPATH": path}}}
        ray.init(**kwargs)
        started = True
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= workers else 0
        actor = ray.remote(num_cpus=1, num_gpus=gpus)(CatalogWorker)
        actors = [actor.remote(loader, cfg, torch_threads) for _ in range(workers)]
        pool = ActorPool(actors)
        for result in pool.map_unordered(lambda a, job: a.run.remote(job), jobs):
            yield result
            bar.update(1)
    finally:
        bar.close()
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------- the job


@dataclass
class CatalogResult:
    """Where the catalog went and its summary (the ``summary`` of ``catalog.json``)."""

    out: Path
    summary: dict


def _texts_check(texts: Sequence[str], source: str) -> None:
    if not any(t.strip() for t in texts):
        raise ValueError(f"The corpus {source} is empty: give a file with some text, or use the built-in corpus.")


def build_catalog(
    out: str | os.PathLike,
    loader: Loader,
    cfg: CatalogConfig = CatalogConfig(),
    *,
    texts: Sequence[str] | None = None,
    rows: Callable[[SFCModel], Iterator[Sequence[int]]] | None = None,
    settings: Mapping | None = None,
    workers: int = 0,
    address: str | None = None,
    torch_threads: int = 1,
    progress: bool = True,
) -> CatalogResult:
    """Build (or resume) the catalog in ``out``; see the module docstring.

    - ``loader()`` returns ``(model, dictionaries)``; it must be picklable for Ray
      (:class:`NamedLoader` is);
    - the text: ``texts`` (documents, packed with the model's tokenizer) or ``rows``
      (a function of the model giving token id rows of ``max_context + 1``);
    - ``settings``: extra entries for ``settings.json`` (the model and dictionaries'
      names), checked like the options on resume;
    - ``workers``, ``address``, ``torch_threads``: see :func:`run_jobs` (they do not
      change the outputs, so they are not settings).

    Everything that can be checked without the model (options, an empty corpus,
    settings that differ from a stored run) is checked before ``loader()`` runs.
    """
    out = Path(out)
    cfg.check()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder: choose another path.")
    if (texts is None) == (rows is None):
        raise ValueError("Give the text either as texts (documents) or as rows (token ids), not both or neither.")
    if texts is not None:
        _texts_check(texts, "given")
    all_settings = {**asdict(cfg), **dict(settings or {})}
    check_settings(out, all_settings)
    t_start = time.perf_counter()
    model, dictionaries = loader()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "settings.json", _json(all_settings))
    row_iter = rows(model) if rows is not None else token_rows(model.tokenizer, texts, cfg.max_context + 1)
    n = collect_samples(out, model, dictionaries, iter(row_iter), cfg, progress)
    t_samples = time.perf_counter()
    members = cluster_samples(out, cfg, n)
    t_cluster = time.perf_counter()
    samples = load_samples(out)
    todo = [c for c in range(cfg.clusters) if not (out / "clusters" / f"{c:03d}" / "result.json").exists()]
    jobs = (make_job(c, members, samples, cfg) for c in todo)
    ran = run_jobs(jobs, len(todo), lambda: CatalogWorker(None, cfg, loaded=(model, dictionaries)), loader, cfg,
                   workers=workers, address=address, torch_threads=torch_threads, progress=progress)
    for result in ran:
        write_cluster(out, result)
    t_circuits = time.perf_counter()
    catalog = write_catalog(out, samples, members, model, all_settings)
    run_info = {"workers": workers, "address": address, "torch_threads": torch_threads,
                "clusters_run_now": len(todo),
                "timings_s": {"samples_and_representations": round(t_samples - t_start, 2),
                              "clustering": round(t_cluster - t_samples, 2),
                              "circuits": round(t_circuits - t_cluster, 2),
                              "total": round(time.perf_counter() - t_start, 2)}}
    atomic_write_bytes(out / "run.json", _json(run_info))
    return CatalogResult(out, catalog["summary"])


def write_cluster(out: Path, result: dict) -> None:
    """Write one cluster's circuit, its viewer page and its result (result last: it marks the cluster done)."""
    from viz.html import render_html

    folder = out / "clusters" / f"{result['cluster']:03d}"
    circuit = Circuit.from_json_dict(result["circuit"])
    circuit.save(folder / "circuit.json")
    render_html(circuit, folder / "circuit.html")
    rest = {k: v for k, v in result.items() if k not in ("circuit", "timings")}
    atomic_write_bytes(folder / "result.json", _json(rest))


def _ratio(own: float | None, other: float | None) -> float | None:
    if own is None or other is None or other <= 0:
        return None
    return own / other


def _example(sample: Sample, model: SFCModel | None, n_tokens: int = 16) -> dict:
    toks = sample.tokens[-n_tokens:]
    if model is not None and model.tokenizer is not None:
        strings = model.token_strings(torch.tensor(toks))
        answer = model.token_strings(torch.tensor([sample.answer]))[0]
    else:
        strings, answer = [f"<{t}>" for t in toks], f"<{sample.answer}>"
    return {"id": sample.id, "context": strings, "answer": answer, "loss_bits": round(sample.loss_bits, 4),
            "truncated": len(sample.tokens) > n_tokens}


def write_catalog(out: Path, samples: Sequence[Sample], members: list[list[int]], model: SFCModel | None,
                  settings: Mapping) -> dict:
    """``catalog.json``, ``index.html`` and ``faithfulness.html`` from the per-cluster results,
    read one at a time."""
    from viz.catalog import catalog_figure, render_catalog_index

    entries = []
    for cid, ms in enumerate(members):
        folder = out / "clusters" / f"{cid:03d}"
        res = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        circuit = Circuit.load(folder / "circuit.json")
        nodes = [nd for nd in circuit.nodes if nd.id != METRIC_ID]
        top = sorted(nodes, key=lambda nd: (-abs(nd.effect), nd.id))[:8]
        own, other = res["faithfulness_own"], res["faithfulness_other"]
        entries.append({
            "id": cid, "size": len(ms), "members": ms, "faithfulness_own": own, "faithfulness_other": other,
            "ratio": _ratio(own, other), "circuit": f"clusters/{cid:03d}/circuit.json",
            "page": f"clusters/{cid:03d}/circuit.html", "n_nodes": len(nodes), "n_edges": len(circuit.edges),
            "n_train": len(res["train"]), "n_held_out": len(res["held_out"]), "n_other": len(res["other"]),
            "top_features": [{"id": nd.id, "effect": round(nd.effect, 6)} for nd in top],
            "examples": [_example(samples[i], model) for i in ms[:5]],
        })
    catalog = {"format": "sfc-catalog", "version": 1, "summary": summarize(entries, len(samples)),
               "settings": dict(settings), "clusters": entries}
    atomic_write_bytes(out / "catalog.json", _json(catalog))
    render_catalog_index(catalog, out / "index.html")
    atomic_write_text(out / "faithfulness.html", catalog_figure(catalog).to_html(include_plotlyjs=True, div_id="faithfulness"))
    return catalog


def summarize(entries: list[dict], n_samples: int) -> dict:
    """The catalog-wide evaluation: own and other faithfulness, their ratio's distribution."""
    pairs = [(e["faithfulness_own"], e["faithfulness_other"]) for e in entries
             if e["faithfulness_own"] is not None and e["faithfulness_other"] is not None]
    ratios = [e["ratio"] for e in entries if e["ratio"] is not None]

    def q(values: list[float]) -> dict | None:
        if not values:
            return None
        a = np.asarray(values, dtype=float)
        return {k: round(float(np.quantile(a, p)), 6) for k, p in
                (("min", 0), ("q25", 0.25), ("median", 0.5), ("q75", 0.75), ("max", 1))}

    return {
        "n_samples": n_samples, "n_clusters": len(entries),
        "n_evaluated": len(pairs),
        "faithfulness_own": q([p[0] for p in pairs]), "faithfulness_other": q([p[1] for p in pairs]),
        "ratio_own_over_other": q(ratios),
        "fraction_own_above_other": round(sum(o > t for o, t in pairs) / len(pairs), 6) if pairs else None,
        "fraction_ratio_above_1": round(sum(r > 1 for r in ratios) / len(ratios), 6) if ratios else None,
    }


# --------------------------------------------------------------------------- loading by name


@dataclass(frozen=True)
class NamedLoader:
    """A picklable loader: ``load_model(model)`` and ``load_dictionaries(model, dictionaries, sites=...)``."""

    model: str
    dictionaries: str | None = None
    sites: tuple[str, ...] | None = None
    device: str = "cpu"

    def __call__(self) -> tuple[SFCModel, Mapping[str, Dictionary]]:
        from attribution.dictionaries.sets import load_dictionaries
        from attribution.model.loading import load_model

        model = load_model(self.model, device=self.device)
        dicts = load_dictionaries(model, self.dictionaries, sites=list(self.sites) if self.sites else None)
        return model, dicts

    def settings(self) -> dict:
        return {f.name: getattr(self, f.name) if f.name != "sites" else (list(self.sites) if self.sites else None)
                for f in fields(self) if f.name != "device"}


__all__ = ["CatalogConfig", "CatalogResult", "CatalogWorker", "ClusterJob", "NamedLoader", "build_catalog",
           "check_settings", "load_samples", "make_job", "run_jobs", "summarize", "write_catalog"]
