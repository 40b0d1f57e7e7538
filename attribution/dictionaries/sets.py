"""A model's dictionaries as one mapping: from a folder, from the cache, or neurons.

:func:`load_dictionaries` is what research code and the command line call; it
returns a :class:`DictionarySet`, a plain ``{site name: dictionary}`` mapping that
also remembers where each dictionary came from (for a circuit's metadata), or with
``lazy=True`` a :class:`LazyDictionarySet`, which keeps the dictionaries on disk
and holds only the few most recently used in memory.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from attribution.dictionaries.formats import Header, load_dictionary, read_header, read_metadata
from attribution.dictionaries.kinds import Dictionary, Identity
from attribution.dictionaries.store import cached_folders, check_fingerprint
from attribution.model.wrapper import SFCModel


class DictionarySet(dict[str, Dictionary]):
    """``{site name: dictionary}`` plus ``ids``: where each came from.

    An id is ``cache:<model>/<site>``, a folder path, or ``identity:<d>`` for neurons.
    """

    def __init__(
        self, dictionaries: dict[str, Dictionary], ids: dict[str, str], folders: dict[str, Path] | None = None
    ) -> None:
        super().__init__(dictionaries)
        self.ids = dict(ids)
        self.folders = dict(folders or {})

    def metadata(self, site: str) -> dict:
        """What the toolkit recorded when it built ``site``'s dictionary (``{}`` if nothing)."""
        folder = self.folders.get(site)
        return read_metadata(folder) if folder is not None else {}


Device = torch.device | str


def placed(
    dictionary: Dictionary, site: str, dtype: torch.dtype | None, device: Device | Mapping[str, Device] | None
) -> Dictionary:
    """``dictionary`` in ``dtype`` on ``device`` (``{site: device}``: the site's entry), where given."""
    if isinstance(device, Mapping):
        device = device.get(site)
    if dtype is None and device is None:
        return dictionary
    return dictionary.to(device=device, dtype=dtype)


class LazyDictionarySet(Mapping[str, Dictionary]):
    """``{site name: dictionary}`` whose dictionaries stay on disk until the engine asks
    for one; at most ``resident`` are in memory at once (the least recently used is dropped).

    The engine works on one site at a time (its states, its node effects, the edges
    into it from the adjacent sites; an evaluation's forward pass splices the sites in
    order), so the weights need never be all in memory. Each request for a site not
    in memory reads its files again: fast from the page cache, and counted in ``loads_of``
    (per site) and ``loads`` (in all).
    Shapes (``shape``, ``nbytes``) come from the files' headers without loading.
    ``dtype`` and ``device`` (one device, or ``{site: device}`` to put each dictionary
    beside its site's block in a model spread over devices), where given, apply to
    each dictionary as it is loaded.
    ``headers`` (:func:`~attribution.dictionaries.formats.read_header` of each folder)
    are read here unless given. Like :class:`DictionarySet` it has ``ids``, ``folders``
    and ``metadata``.
    """

    def __init__(
        self,
        folders: Mapping[str, str | os.PathLike],
        ids: Mapping[str, str] | None = None,
        *,
        resident: int = 4,
        dtype: torch.dtype | None = None,
        device: Device | Mapping[str, Device] | None = None,
        headers: Mapping[str, Header] | None = None,
    ) -> None:
        if resident < 1:
            raise ValueError(f"resident={resident}: a lazy dictionary set must hold at least one dictionary.")
        self.folders = {name: Path(folder) for name, folder in folders.items()}
        self.ids = dict(ids) if ids is not None else {name: str(f) for name, f in self.folders.items()}
        self.resident, self.dtype, self.device = resident, dtype, device
        self.headers = {name: (headers or {}).get(name) or read_header(f) for name, f in self.folders.items()}
        self.loads_of: dict[str, int] = {}
        self._cache: OrderedDict[str, Dictionary] = OrderedDict()  # least recently used first

    def __getitem__(self, name: str) -> Dictionary:
        if name not in self.folders:
            raise KeyError(name)
        dictionary = self._cache.pop(name, None)
        if dictionary is None:
            while len(self._cache) >= self.resident:  # drop before loading: never resident + 1 here
                self._cache.popitem(last=False)
            # Weights are scanned for NaN or infinity on the first read only.
            loaded = load_dictionary(self.folders[name], check_finite=name not in self.loads_of)
            dictionary = placed(loaded, name, self.dtype, self.device)
            self.loads_of[name] = self.loads_of.get(name, 0) + 1
        self._cache[name] = dictionary
        return dictionary

    def __iter__(self) -> Iterator[str]:
        return iter(self.folders)

    def __len__(self) -> int:
        return len(self.folders)

    def __contains__(self, name: object) -> bool:
        return name in self.folders

    @property
    def loads(self) -> int:
        """How many times a dictionary was read from disk, in all."""
        return sum(self.loads_of.values())

    def resident_sites(self) -> list[str]:
        """The sites whose dictionaries are in memory now, least recently used first."""
        return list(self._cache)

    def shape(self, name: str) -> tuple[int, int]:
        """``(d, width)`` of ``name``'s dictionary, from its headers."""
        header = self.headers[name]
        return header.d, header.width

    def nbytes(self, name: str) -> int:
        """Bytes of ``name``'s weights once loaded (in ``dtype`` where one is set)."""
        header = self.headers[name]
        size = torch.empty(0, dtype=self.dtype).element_size() if self.dtype is not None else header.itemsize
        return header.numel * size

    def metadata(self, site: str) -> dict:
        """What the toolkit recorded when it built ``site``'s dictionary (``{}`` if nothing)."""
        return read_metadata(self.folders[site])


def load_dictionaries(
    model: SFCModel,
    folder: str | os.PathLike | None = None,
    *,
    sites: list[str] | None = None,
    neurons: bool = False,
    lazy: bool = False,
    resident: int = 4,
    dtype: torch.dtype | None = None,
    device: Device | Mapping[str, Device] | None = None,
) -> DictionarySet | LazyDictionarySet:
    """The dictionaries of ``model``, keyed by site, checked against its sites.

    - ``folder``: one sub-folder per site, in any supported layout
      (:func:`attribution.dictionaries.formats.load_dictionary`); without it, the
      toolkit's cache for ``model.cache_key`` (built by ``sfc dictionaries build``).
      Either way a dictionary whose metadata records another model's
      fingerprint is refused.
    - ``sites``: the sites to load (default: every one there is).
    - ``neurons``: the paper's neuron baseline: the identity at the same sites,
      so that nodes are neurons.
    - ``lazy``: keep the dictionaries on disk and hold at most ``resident`` in
      memory (a :class:`LazyDictionarySet`), for dictionaries that do not fit
      all at once; results are the same, each site's files are read again when
      a pass comes back to it.
    - ``dtype``, ``device``: cast or move each dictionary as it is loaded, one at a
      time (``torch.bfloat16`` halves the weights' memory; ``device`` may be
      ``{site: device}`` for a model spread over several devices).

    Everything is checked from metadata and file headers before any weight is
    read: one clear sentence for a missing folder, an unknown site, or a
    dictionary whose size does not match the site's.
    """
    if not isinstance(model, SFCModel):
        raise TypeError(
            f"load_dictionaries needs the loaded model, got {type(model).__name__}: "
            "call sfc.load_model(name) first and pass the model."
        )
    if folder is not None:
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"No dictionary folder at {root}: give a folder with one sub-folder per site.")
        names = sites or sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        model.sites(names)  # unknown site names fail here, listing the model's sites
        for name in names:
            check_fingerprint(root / name, read_metadata(root / name), model, name)
        folders = {name: root / name for name in names}
        ids = {name: str(root / name) for name in names}
    else:
        folders = cached_folders(model.name, sites, model=model)
        ids = {name: f"cache:{model.cache_key}/{name}" for name in folders}
    by_name = {s.name: s for s in model.all_sites()}
    headers = {name: read_header(path) for name, path in folders.items()}
    for name, header in headers.items():
        if header.d != by_name[name].d:
            raise ValueError(
                f"The dictionary for site {name!r} expects size {header.d}, but {model.name}'s {name} has size "
                f"{by_name[name].d}: it was made for another model."
            )
    if neurons:
        dicts = {name: Identity(by_name[name].d) for name in folders}
        return DictionarySet(dicts, {name: f"identity:{by_name[name].d}" for name in dicts}, {})
    if lazy:
        return LazyDictionarySet(folders, ids, resident=resident, dtype=dtype, device=device, headers=headers)
    dicts = {name: placed(load_dictionary(path), name, dtype, device) for name, path in folders.items()}
    return DictionarySet(dicts, ids, folders)
