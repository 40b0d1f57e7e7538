"""A model's dictionaries as one mapping: from a folder, from the cache, or neurons.

:func:`load_dictionaries` is what research code and the command line call; it
returns a :class:`DictionarySet`, a plain ``{site name: dictionary}`` mapping that
also remembers where each dictionary came from (for a circuit's metadata).
"""

from __future__ import annotations

import os
from pathlib import Path

from attribution.cache import dictionary_cache
from attribution.dictionaries.formats import load_dictionary, read_metadata
from attribution.dictionaries.kinds import Dictionary, Identity
from attribution.dictionaries.store import check_fingerprint, load_cached_dictionaries
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


def load_dictionaries(
    model: SFCModel,
    folder: str | os.PathLike | None = None,
    *,
    sites: list[str] | None = None,
    neurons: bool = False,
) -> DictionarySet:
    """The dictionaries of ``model``, keyed by site, checked against its sites.

    - ``folder``: one sub-folder per site, in any supported layout
      (:func:`attribution.dictionaries.formats.load_dictionary`); without it, the
      toolkit's cache for ``model.cache_key`` (built by ``sfc dictionaries build``).
      Either way a dictionary whose metadata records another model's
      fingerprint is refused.
    - ``sites``: the sites to load (default: every one there is).
    - ``neurons``: the paper's neuron baseline: the identity at the same sites,
      so that nodes are neurons.

    Raises one clear sentence for a missing folder, an unknown site, or a
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
        dicts = {name: load_dictionary(root / name) for name in names}
        ids = {name: str(root / name) for name in names}
    else:
        root = dictionary_cache(model.cache_key)
        dicts = load_cached_dictionaries(model.name, sites, model=model)
        ids = {name: f"cache:{model.cache_key}/{name}" for name in dicts}
    folders = {name: root / name for name in dicts}
    by_name = {s.name: s for s in model.all_sites()}
    for name, dic in dicts.items():
        if dic.d != by_name[name].d:
            raise ValueError(
                f"The dictionary for site {name!r} expects size {dic.d}, but {model.name}'s {name} has size "
                f"{by_name[name].d}: it was made for another model."
            )
    if neurons:
        dicts = {name: Identity(by_name[name].d) for name in dicts}
        ids = {name: f"identity:{by_name[name].d}" for name in dicts}
        folders = {}
    return DictionarySet(dicts, ids, folders)
