"""Circuits: the graph of nodes and edges that attribution finds, and its file format.

A *circuit* is a directed graph. Its *nodes* are features (one latent of a
dictionary at a site) and error nodes (the dictionary's residual at a site),
each at one token position, or summed over positions when the circuit is
aggregated with ``"sum"`` (SPEC §4.2). One extra node, the *metric node*
``"y"``, stands for the metric itself. Every node carries its *effect*: its
indirect effect on the metric (paper Eqs. 2-4). *Edges* point upstream ->
downstream and carry an *edge weight* (paper Eq. 5); the last edges end in
``"y"``.

Node ids are strings that every consumer (the viewer, evaluation, the CLI)
relies on::

    "{site}/{feature}"      a feature summed over positions     "mlp_1/77"
    "{site}/{feature}@{p}"  a feature at position p            "resid_3/1234@5"
    "{site}/err@{p}"        the error node at position p       "attn_2/err@0"
    "y"                     the metric node

:func:`node_id` builds them and :func:`parse_node_id` takes them apart.

On disk a circuit is one JSON file (``format: "sfc-circuit"``), versioned by
``schema_version`` and described by ``circuits/schema/circuit.schema.json``
and ``docs/circuit-format.md``. :meth:`Circuit.save` writes it
deterministically (save -> load -> save gives identical bytes) and atomically;
:meth:`Circuit.load` validates it and says in one sentence what is wrong.
:meth:`Circuit.to_neuronpedia` writes the graph layout that Neuronpedia and
circuit-tracer's frontend read.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache
from importlib import metadata as _pkg_metadata
from pathlib import Path
from typing import Any, Literal

import networkx as nx

from attribution.cache import atomic_write_text
from attribution.options import Aggregation, Method

NodeKind = Literal["embed", "attn", "mlp", "resid", "metric"]

FORMAT = "sfc-circuit"
SCHEMA_VERSION = 1
METRIC_ID = "y"
SCHEMA_PATH = Path(__file__).parent / "schema" / "circuit.schema.json"

_KIND_ORDER: dict[str, int] = {"embed": 0, "attn": 1, "mlp": 2, "resid": 3, "metric": 4}
_ID_RE = re.compile(r"^(?P<site>[^/@]+)/(?P<feat>err|\d+)(?:@(?P<pos>\d+))?$")


def _toolkit_version() -> str:
    try:
        return _pkg_metadata.version("sparse-feature-circuits")
    except _pkg_metadata.PackageNotFoundError:
        return "0+unknown"


# --------------------------------------------------------------------------- ids


def node_id(site: str, feature: int | None, position: int | None) -> str:
    """The id of the node at ``site``: a feature, or the error node when ``feature`` is None.

    ``position`` is None for nodes summed over positions. ``node_id("y", None,
    None)`` is the metric node's id, ``"y"``.
    """
    if site == METRIC_ID:
        return METRIC_ID
    base = f"{site}/{'err' if feature is None else int(feature)}"
    return base if position is None else f"{base}@{int(position)}"


def parse_node_id(nid: str) -> tuple[str, int | None, int | None]:
    """``(site, feature, position)`` from a node id; ``feature`` is None for error nodes and ``"y"``."""
    if nid == METRIC_ID:
        return METRIC_ID, None, None
    m = _ID_RE.match(nid)
    if m is None:
        raise ValueError(
            f"Node id {nid!r} is malformed: expected 'site/feature', 'site/err' or 'y', "
            "optionally followed by '@position'."
        )
    feat = None if m["feat"] == "err" else int(m["feat"])
    pos = None if m["pos"] is None else int(m["pos"])
    return m["site"], feat, pos


def site_kind_layer(site: str) -> tuple[NodeKind, int]:
    """The kind and layer of a site name (``"embed"`` has layer -1; ``"mlp_3"`` is ("mlp", 3))."""
    if site == "embed":
        return "embed", -1
    kind, _, layer = site.rpartition("_")
    if kind not in ("attn", "mlp", "resid") or not layer.isdigit():
        raise ValueError(
            f"Site {site!r} is not a site name: expected 'embed', 'attn_L', 'mlp_L' or 'resid_L'."
        )
    return kind, int(layer)  # type: ignore[return-value]


# ------------------------------------------------------------------ containers


@dataclass
class Node:
    """One node: a feature or error node at a site (and position), or the metric node.

    ``effect`` is the node's indirect effect on the metric (for ``"y"``: the
    total effect). ``activation`` is the feature's mean activation when known;
    ``label`` a human description (an autointerp label, say).
    """

    id: str
    site: str
    kind: NodeKind
    layer: int
    position: int | None
    feature: int | None
    is_error: bool
    effect: float
    activation: float | None = None
    label: str | None = None

    @classmethod
    def make(
        cls,
        site: str,
        feature: int | None,
        position: int | None,
        effect: float,
        activation: float | None = None,
        label: str | None = None,
    ) -> Node:
        """A feature node (``feature`` an int) or error node (``feature=None``), id and kind derived."""
        kind, layer = site_kind_layer(site)
        return cls(
            node_id(site, feature, position),
            site,
            kind,
            layer,
            position,
            feature,
            feature is None,
            float(effect),
            activation,
            label,
        )

    @classmethod
    def metric(cls, n_layers: int, total_effect: float) -> Node:
        """The metric node ``"y"``, one layer above the last block."""
        return cls(METRIC_ID, METRIC_ID, "metric", n_layers, None, None, False, float(total_effect))

    @property
    def feature_key(self) -> str:
        """``"site/feature"`` (or ``"site/err"``) without the position: the key of a dashboard."""
        return node_id(self.site, self.feature, None)


@dataclass
class Edge:
    """A directed edge upstream -> downstream with its edge weight (paper Eq. 5)."""

    source: str
    target: str
    weight: float


@dataclass(kw_only=True)
class CircuitMetadata:
    """How a circuit was made: model, dictionaries, task, method, thresholds.

    ``sites`` lists the sites in forward order; ``dictionaries`` maps each site
    to the path or id of its dictionary. ``prompt_tokens`` has one string per
    position (aggregation ``"none"`` only). ``extra`` holds anything JSON-able.
    """

    model: str
    sites: list[str]
    n_layers: int
    dictionaries: dict[str, str] = field(default_factory=dict)
    task: str | None = None
    method: Method = "ig"
    aggregation: Aggregation = "none"
    node_threshold: float = 0.0
    edge_threshold: float = 0.0
    top_k: int | None = None
    n_examples: int = 0
    toolkit_version: str = field(default_factory=_toolkit_version)
    prompt_tokens: list[str] | None = None
    total_effect: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SiteCount:
    """Feature and error nodes at one site."""

    features: int
    errors: int


@dataclass
class CircuitSummary:
    """Counts that describe a circuit at a glance; ``str()`` renders a small table."""

    n_nodes: int
    n_features: int
    n_errors: int
    n_edges: int
    n_edges_to_metric: int
    per_site: dict[str, SiteCount]
    total_effect: float | None
    sum_of_effects: float

    def __str__(self) -> str:
        lines = [
            f"{self.n_nodes} nodes ({self.n_features} features, {self.n_errors} error nodes), "
            f"{self.n_edges} edges ({self.n_edges_to_metric} into y)",
            f"total effect {self.total_effect}, sum of node effects {self.sum_of_effects:.6g}",
        ]
        lines += [
            f"  {s:>10}: {c.features:6d} features {c.errors:5d} errors"
            for s, c in self.per_site.items()
        ]
        return "\n".join(lines)


class CircuitFormatError(ValueError):
    """A circuit file that cannot be read; the message says which field and what is wrong."""


@dataclass
class Circuit:
    """Nodes, edges and metadata; optionally feature dashboards for the viewer.

    ``dashboards`` maps a feature key ``"site/feature"`` to
    ``{"contexts": [{"tokens", "acts"}], "promoted": [{"token", "value"}],
    "suppressed": [...]}``; this module stores it and never interprets it.
    """

    nodes: list[Node]
    edges: list[Edge]
    metadata: CircuitMetadata
    dashboards: dict[str, Any] | None = None

    # ------------------------------------------------------------ access

    def node_map(self) -> dict[str, Node]:
        """Nodes by id."""
        return {n.id: n for n in self.nodes}

    def _order_key(self) -> Any:
        site_rank = {s: i for i, s in enumerate(self.metadata.sites)}

        def key(n: Node) -> tuple:
            rank = site_rank.get(n.site, len(site_rank) + (n.site == METRIC_ID))
            return (
                rank,
                -1 if n.position is None else n.position,
                n.is_error,
                -1 if n.feature is None else n.feature,
                n.id,
            )

        return key

    def feature_labels(self) -> dict[str, str]:
        """Human labels by feature key ``"site/feature"``: node ``label`` fields, overridden by
        ``metadata.extra["labels"]`` (where ``sfc view --labels`` keeps them). Empty ones are left out."""
        out = {n.feature_key: n.label for n in self.nodes
               if n.label and n.kind != "metric" and not n.is_error}
        extra = self.metadata.extra.get("labels") or {}
        out.update({k: v for k, v in extra.items() if isinstance(v, str) and v.strip()})
        return out

    # ------------------------------------------------------------ graph ops

    def prune_to_metric(self) -> Circuit:
        """The circuit without nodes (and their edges) that have no directed path to ``"y"``."""
        if METRIC_ID not in self.node_map():
            raise ValueError("This circuit has no metric node 'y', so nothing can reach it.")
        preds: dict[str, list[str]] = {}
        for e in self.edges:
            preds.setdefault(e.target, []).append(e.source)
        keep, todo = {METRIC_ID}, deque([METRIC_ID])
        while todo:
            for p in preds.get(todo.popleft(), ()):
                if p not in keep:
                    keep.add(p)
                    todo.append(p)
        return self._subgraph(keep, self.edges)

    def filter(
        self,
        node_threshold: float | None = None,
        edge_threshold: float | None = None,
        top_k: int | None = None,
    ) -> Circuit:
        """Nodes with ``|effect| > node_threshold`` (then the ``top_k`` largest ``|effect|``), edges
        with ``|weight| > edge_threshold`` between kept nodes (SPEC §4.3). ``"y"`` always stays.

        The thresholds applied are recorded in the metadata.
        """
        cand = [
            n
            for n in self.nodes
            if n.id != METRIC_ID and (node_threshold is None or abs(n.effect) > node_threshold)
        ]
        if top_k is not None:
            cand = sorted(cand, key=lambda n: (-abs(n.effect), n.id))[:top_k]
        keep = {n.id for n in cand} | {METRIC_ID}
        edges = [e for e in self.edges if edge_threshold is None or abs(e.weight) > edge_threshold]
        out = self._subgraph(keep, edges)
        md = out.metadata
        if node_threshold is not None:
            md.node_threshold = float(node_threshold)
        if edge_threshold is not None:
            md.edge_threshold = float(edge_threshold)
        if top_k is not None:
            md.top_k = int(top_k)
        return out

    def _subgraph(self, keep: set[str], edges: list[Edge]) -> Circuit:
        return Circuit(
            nodes=[replace(n) for n in self.nodes if n.id in keep],
            edges=[replace(e) for e in edges if e.source in keep and e.target in keep],
            metadata=replace(self.metadata),
            dashboards=self.dashboards,
        )

    def summary(self) -> CircuitSummary:
        """Node counts per site (forward order), error nodes, edges and effect totals."""
        feats = Counter(n.site for n in self.nodes if n.kind != "metric" and not n.is_error)
        errs = Counter(n.site for n in self.nodes if n.is_error)
        sites = [s for s in self.metadata.sites if s in feats or s in errs]
        sites += sorted((set(feats) | set(errs)) - set(sites))
        body = [n for n in self.nodes if n.kind != "metric"]
        return CircuitSummary(
            n_nodes=len(body),
            n_features=sum(feats.values()),
            n_errors=sum(errs.values()),
            n_edges=len(self.edges),
            n_edges_to_metric=sum(e.target == METRIC_ID for e in self.edges),
            per_site={s: SiteCount(feats[s], errs[s]) for s in sites},
            total_effect=self.metadata.total_effect,
            sum_of_effects=float(sum(n.effect for n in body)),
        )

    # ------------------------------------------------------------ networkx

    def to_networkx(self) -> nx.DiGraph:
        """A DiGraph keyed by node id; node attributes are the :class:`Node` fields, edges carry
        ``weight``, and ``G.graph`` holds ``metadata`` (a dict) and ``dashboards``."""
        g = nx.DiGraph(metadata=asdict(self.metadata), dashboards=self.dashboards)
        for n in self.nodes:
            g.add_node(n.id, **asdict(n))
        for e in self.edges:
            g.add_edge(e.source, e.target, weight=e.weight)
        return g

    @classmethod
    def from_networkx(cls, g: nx.DiGraph) -> Circuit:
        """The inverse of :meth:`to_networkx`."""
        if "metadata" not in g.graph:
            raise ValueError(
                "This graph has no 'metadata' graph attribute; build it with Circuit.to_networkx."
            )
        names = {f.name for f in fields(Node)}
        nodes = [
            Node(**{k: v for k, v in attrs.items() if k in names} | {"id": nid})
            for nid, attrs in g.nodes(data=True)
        ]
        edges = [Edge(u, v, float(d["weight"])) for u, v, d in g.edges(data=True)]
        return cls(nodes, edges, CircuitMetadata(**g.graph["metadata"]), g.graph.get("dashboards"))

    # ------------------------------------------------------------ JSON

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON document, nodes and edges in canonical (forward) order."""
        key = self._order_key()
        nodes = sorted(self.nodes, key=key)
        rank = {n.id: i for i, n in enumerate(nodes)}
        edges = sorted(
            self.edges,
            key=lambda e: (rank.get(e.target, -1), rank.get(e.source, -1), e.target, e.source),
        )
        doc: dict[str, Any] = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "metadata": _metadata_to_json(self.metadata),
            "nodes": [_node_to_json(n) for n in nodes],
            "edges": [
                {"source": e.source, "target": e.target, "weight": _num(e.weight, e.source)}
                for e in edges
            ],
        }
        if self.dashboards is not None:
            doc["dashboards"] = self.dashboards
        return doc

    @classmethod
    def from_json_dict(cls, doc: Any, source: str = "circuit") -> Circuit:
        """Validate a JSON document (schema and id consistency) and build the circuit."""
        _validate(doc, source)
        md = CircuitMetadata(**doc["metadata"])
        nodes = [Node(**{"activation": None, "label": None} | n) for n in doc["nodes"]]
        edges = [Edge(**e) for e in doc["edges"]]
        _check_consistency(nodes, edges, source)
        _check_values(nodes, edges, md, source)
        return cls(nodes, edges, md, doc.get("dashboards"))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the circuit as JSON, atomically (temp file + rename), deterministic bytes."""
        return atomic_write_text(path, _dumps(self.to_json_dict()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Circuit:
        """Read and validate a circuit file written by :meth:`save` (or by hand, per the schema)."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise CircuitFormatError(
                f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})."
            ) from None
        return cls.from_json_dict(doc, str(path))

    # ------------------------------------------------------------ Neuronpedia

    def to_neuronpedia(self, slug: str | None = None, scan: str | None = None) -> dict[str, Any]:
        """The graph in the Neuronpedia / circuit-tracer frontend layout.

        That layout has one "layer" per row of the drawing, so each non-embed
        site becomes its own row (``layer`` = its index among non-embed sites in
        forward order, as a string); embed-site nodes sit on the ``"E"`` row with
        ``feature_type`` ``"embedding"``; ``"y"`` is the ``"logit"`` node on row
        ``n_rows + 1``. Node ids follow circuit-tracer: ``"{layer}_{feature}_{ctx}"``,
        with feature -1 for error nodes. ``influence`` is our effect, ``clerp``
        our id and the feature's label: the human one (:meth:`feature_labels`),
        else the automatic one (``metadata.extra["auto_labels"]``) marked
        ``(auto)``. Nodes summed over positions get ``ctx_idx`` 0. The layout
        has no place for dashboards (Neuronpedia serves its own), so they stay
        in the ``sfc-circuit`` file.
        """
        md = self.metadata
        rows = [s for s in md.sites if s != "embed"]
        extra_sites = sorted({n.site for n in self.nodes} - set(rows) - {"embed", METRIC_ID})
        row_of = {s: i for i, s in enumerate(rows + extra_sites)}
        logit_layer = len(row_of) + 1
        tokens = md.prompt_tokens or [md.task or "(summed over positions)"]
        last = len(tokens) - 1

        def entry(n: Node) -> dict[str, Any]:
            ctx = 0 if n.position is None else n.position
            feat = -1 if n.is_error else int(n.feature or 0)
            clerp = n.id if not n.label else f"{n.id}: {n.label}"
            if n.kind == "metric":
                return dict(
                    node_id=f"{logit_layer}_0_{last}",
                    feature=0,
                    layer=str(logit_layer),
                    ctx_idx=last,
                    feature_type="logit",
                    token_prob=0.0,
                    is_target_logit=True,
                    jsNodeId=f"L_0-{last}",
                    clerp=f"metric{' ' + md.task if md.task else ''} (total effect {n.effect:.4g})",
                    influence=n.effect,
                    activation=None,
                )
            if n.kind == "embed":
                layer, ftype = "E", "embedding"
                js = f"E_{feat}-{ctx}"
            else:
                layer = str(row_of[n.site])
                ftype = "mlp reconstruction error" if n.is_error else "cross layer transcoder"
                js = f"{layer}_-1-{ctx}" if n.is_error else f"{layer}_{feat}-0"
            return dict(
                node_id=f"{layer}_{feat}_{ctx}",
                feature=_cantor(row_of.get(n.site, 0), feat),
                layer=layer,
                ctx_idx=ctx,
                feature_type=ftype,
                token_prob=0.0,
                is_target_logit=False,
                jsNodeId=js,
                clerp=clerp,
                influence=n.effect,
                activation=n.activation,
            )

        human = self.feature_labels()
        auto = {k: v for k, v in (md.extra.get("auto_labels") or {}).items() if isinstance(v, str) and v}
        entries = {n.id: entry(n) for n in sorted(self.nodes, key=self._order_key())}
        for n in self.nodes:  # labels by feature key: a human one, else the automatic one, marked
            key = n.feature_key
            if n.kind != "metric" and not n.is_error and (key in human or key in auto):
                entries[n.id]["clerp"] = f"{n.id}: {human[key]}" if key in human else f"{n.id}: {auto[key]} (auto)"
        np_ids = [e["node_id"] for e in entries.values()]
        if len(set(np_ids)) != len(np_ids):
            dup = next(i for i, c in Counter(np_ids).items() if c > 1)
            raise ValueError(
                f"Two nodes map to the Neuronpedia id {dup!r}; node ids must be unique."
            )
        links = [
            {
                "source": entries[e.source]["node_id"],
                "target": entries[e.target]["node_id"],
                "weight": e.weight,
            }
            for e in self.edges
            if e.source in entries and e.target in entries
        ]
        return {
            "metadata": {
                "slug": slug or _slug(md),
                "scan": scan or md.model,
                "prompt_tokens": list(tokens),
                "prompt": "".join(md.prompt_tokens) if md.prompt_tokens else tokens[0],
                "node_threshold": md.node_threshold,
                "schema_version": 1,
            },
            "qParams": {
                "pinnedIds": [],
                "supernodes": [],
                "linkType": "both",
                "clickedId": "",
                "sg_pos": "",
            },
            "nodes": list(entries.values()),
            "links": links,
        }

    def save_neuronpedia(
        self, path: str | os.PathLike, slug: str | None = None, scan: str | None = None
    ) -> Path:
        """Write :meth:`to_neuronpedia` to ``path`` as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(self.to_neuronpedia(slug, scan), indent=2) + "\n", encoding="utf-8"
        )
        return path


# ------------------------------------------------------------------ helpers


def _cantor(x: int, y: int) -> int:
    # circuit-tracer's unique integer per (layer, feature); error nodes keep -1.
    return -1 if y < 0 else (x + y) * (x + y + 1) // 2 + y


def _slug(md: CircuitMetadata) -> str:
    raw = f"{md.model}-{md.task or 'circuit'}-{md.aggregation}"
    return re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")


def _num(x: float, where: str) -> float:
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(
            f"{where} has a non-finite value ({x}); circuits store finite numbers only."
        )
    return x


def _node_to_json(n: Node) -> dict[str, Any]:
    d = asdict(n)
    d["effect"] = _num(n.effect, f"Node {n.id!r} effect")
    if n.activation is not None:
        d["activation"] = _num(n.activation, f"Node {n.id!r} activation")
    return d


def _metadata_to_json(md: CircuitMetadata) -> dict[str, Any]:
    d = asdict(md)
    for k in ("node_threshold", "edge_threshold"):
        d[k] = _num(d[k], f"metadata.{k}")
    if md.total_effect is not None:
        d["total_effect"] = _num(md.total_effect, "metadata.total_effect")
    return d


def _dumps(doc: dict[str, Any]) -> str:
    """Deterministic JSON text: sorted keys, one list item / metadata key per line.

    Floats go through ``repr`` (json's default), which round-trips exactly, so
    ``save(load(save(c)))`` reproduces the bytes.
    """

    def one(x: Any) -> str:
        return json.dumps(
            x, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(", ", ": ")
        )

    parts = []
    for k in sorted(doc):
        v = doc[k]
        if isinstance(v, list) and v:
            body = ",\n".join("  " + one(x) for x in v)
            parts.append(f"{one(k)}: [\n{body}\n]")
        elif isinstance(v, dict) and v:
            body = ",\n".join(f"  {one(kk)}: {one(v[kk])}" for kk in sorted(v))
            parts.append(f"{one(k)}: {{\n{body}\n}}")
        else:
            parts.append(f"{one(k)}: {one(v)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


@cache
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def _where(path: Any) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "the top level"


def _validate(doc: Any, source: str) -> None:
    import jsonschema

    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CircuitFormatError(
            f"{source} is not a sparse-feature-circuits circuit file (its 'format' is not {FORMAT!r})."
        )
    version = doc.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise CircuitFormatError(
            f"{source} has schema_version {version}, made by a newer version of "
            f"sparse-feature-circuits (this one reads up to {SCHEMA_VERSION}); upgrade the package."
        )
    validator = jsonschema.Draft202012Validator(_schema())
    err = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if err is not None:
        raise CircuitFormatError(
            f"{source} is not a valid circuit file: at {_where(err.absolute_path)}, {err.message}."
        )


def _check_consistency(nodes: list[Node], edges: list[Edge], source: str) -> None:
    """Ids agree with the fields they encode, are unique, and every edge joins two nodes."""
    seen: set[str] = set()
    for i, n in enumerate(nodes):
        expect = node_id(n.site, None if n.is_error else n.feature, n.position)
        if n.kind == "metric" or n.site == METRIC_ID:
            ok = n.id == METRIC_ID and n.site == METRIC_ID and n.kind == "metric"
        else:
            ok = n.id == expect and (n.feature is None) == n.is_error
        if not ok:
            raise CircuitFormatError(
                f"{source}: nodes[{i}] has id {n.id!r}, which disagrees with its site/feature/"
                f"position/kind fields (expected {expect!r})."
            )
        if n.id in seen:
            raise CircuitFormatError(f"{source}: node id {n.id!r} appears more than once.")
        seen.add(n.id)
    for i, e in enumerate(edges):
        for end in (e.source, e.target):
            if end not in seen:
                raise CircuitFormatError(
                    f"{source}: edges[{i}] refers to node {end!r}, which is not in 'nodes'."
                )


def _check_values(nodes: list[Node], edges: list[Edge], md: CircuitMetadata, source: str) -> None:
    """What the viewer checks, on every load path: finite effects and weights (JSON's ``NaN`` and
    ``Infinity`` parse, but are refused), node sites listed in ``metadata.sites``, and positions
    within ``metadata.prompt_tokens`` for a per-position circuit."""
    sites = set(md.sites)
    tokens = md.prompt_tokens if md.aggregation == "none" else None
    for i, n in enumerate(nodes):
        if not math.isfinite(n.effect):
            raise CircuitFormatError(f"{source}: nodes[{i}] ({n.id}) has effect {n.effect}; circuit files hold "
                                     "finite numbers only: re-create the file with `sfc discover`.")
        if n.activation is not None and not math.isfinite(n.activation):
            raise CircuitFormatError(f"{source}: nodes[{i}] ({n.id}) has activation {n.activation}; circuit "
                                     "files hold finite numbers only: re-create the file with `sfc discover`.")
        if n.id != METRIC_ID and n.site not in sites:
            raise CircuitFormatError(f"{source}: nodes[{i}] ({n.id}) is at site {n.site!r}, which "
                                     f"metadata.sites does not list ({', '.join(md.sites) or 'none'}): add the "
                                     "site to metadata.sites or remove the node.")
        if tokens is not None and n.id != METRIC_ID and n.position is not None and n.position >= len(tokens):
            raise CircuitFormatError(f"{source}: nodes[{i}] ({n.id}) is at position {n.position}, outside the "
                                     f"{len(tokens)} prompt tokens in metadata.prompt_tokens.")
    for i, e in enumerate(edges):
        if not math.isfinite(e.weight):
            raise CircuitFormatError(f"{source}: edges[{i}] ({e.source} -> {e.target}) has weight {e.weight}; "
                                     "circuit files hold finite numbers only: re-create the file with "
                                     "`sfc discover`.")


def check_widths(circuit: Circuit, widths: Mapping[str, int], source: str = "the circuit") -> None:
    """Every node's site has a dictionary and every feature index is below that dictionary's width.

    Raises :class:`CircuitFormatError` naming the first node that does not fit
    (the circuit was made with other dictionaries).
    """
    for n in circuit.nodes:
        if n.id == METRIC_ID:
            continue
        if n.site not in widths:
            raise CircuitFormatError(f"{source}: node {n.id} is at site {n.site!r}, which has no dictionary "
                                     f"(loaded: {', '.join(widths) or 'none'}): load the dictionaries the "
                                     "circuit was made with (--dictionaries).")
        if n.feature is not None and n.feature >= widths[n.site]:
            raise CircuitFormatError(f"{source}: node {n.id} is feature {n.feature}, but the dictionary at "
                                     f"{n.site} has only {widths[n.site]} features: the circuit was made with "
                                     "other dictionaries; load those (--dictionaries).")


def load_circuit(path: str | os.PathLike) -> Circuit:
    """Read and validate a circuit file (:meth:`Circuit.load`)."""
    return Circuit.load(path)
