"""The edited model: flagged features ablated on every forward pass, plus the probe (SPEC §6.5).

At each edited site, in forward order and in the same pass (so downstream sites
see upstream edits), the activation ``x [b, s, d]`` becomes

    x <- decode(f') + (x - decode(f)),   f = encode(x),

where ``f'`` is ``f`` with the flagged features set to their ablation values
(0 for SHIFT; a fixed mean for the neuron skyline) at every position, and the
SAE error ``x - decode(f)`` is kept. :class:`EditedModel` applies this with plain
PyTorch forward hooks while it is entered as a context manager, so it works for
any later forward pass (``model.hf(...)``, ``generate``, nnsight traces, the
toolkit's own passes). It saves to a folder as ``edit.json`` (flags, model,
dictionary ids, settings) and ``tensors.safetensors`` (probe, ablation values):
no pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from attribution.cache import atomic_dir, atomic_write_text
from attribution.dictionaries.kinds import Dictionary
from attribution.model.sites import get_module
from attribution.model.wrapper import SFCModel
from circuits.flags import FeatureFlags

EDIT_FORMAT = "sfc-shift-edit"


class EditedModel:
    """``model`` with ``flagged`` features (``site -> feature indices``) ablated at ``dictionaries``' sites.

    - ``values``: ablation value per flagged feature (``site -> [k]``, same order as
      ``flagged[site]`` as given); default zeros (zero ablation).
    - ``probe`` / ``probe_layer``: the classifier that goes with the edit (optional).
    - ``with edited: ...`` installs the hooks; leaving removes them (re-entrant safe:
      entering twice raises).
    """

    def __init__(
        self,
        model: SFCModel,
        dictionaries: Mapping[str, Dictionary],
        flagged: Mapping[str, list[int]],
        *,
        values: Mapping[str, Tensor] | None = None,
        probe: nn.Linear | None = None,
        probe_layer: int | None = None,
        dictionary_ids: Mapping[str, str] | None = None,
        info: dict | None = None,
    ) -> None:
        self.model = model
        values = dict(values or {})
        self.flagged, self.values = {}, {}
        for s, idx in flagged.items():
            idx = [int(i) for i in idx]
            if not idx:
                continue
            order = sorted(range(len(idx)), key=lambda j: idx[j])
            self.flagged[s] = [idx[j] for j in order]
            if s in values:
                v = torch.as_tensor(values[s]).float()
                if v.shape != (len(idx),):
                    raise ValueError(f"values[{s!r}] has shape {tuple(v.shape)}, but {len(idx)} features are "
                                     "flagged there: give one value per flagged feature.")
                self.values[s] = v[order]
        widths = {s: d.width for s, d in dictionaries.items()}
        FeatureFlags(self.flagged).check(widths)
        self.dictionaries = {s: dictionaries[s] for s in self.flagged}
        self.probe = probe
        self.probe_layer = probe_layer
        self.dictionary_ids = dict(dictionary_ids or getattr(dictionaries, "ids", {}) or {})
        self.info = dict(info or {})
        self._handles: list = []
        by_name = {s.name: s for s in model.all_sites()}
        unknown = [s for s in self.flagged if s not in by_name]
        if unknown:
            raise ValueError(f"Flagged site(s) {unknown} are not sites of {model.name}.")
        self._sites = sorted((by_name[s] for s in self.flagged), key=lambda s: s.order)

    def __len__(self) -> int:
        return sum(len(v) for v in self.flagged.values())

    @property
    def keys(self) -> list[str]:
        return [f"{s}/{i}" for s, idx in self.flagged.items() for i in idx]

    def edit(self, site: str, x: Tensor) -> Tensor:
        """The edited activation at ``site`` for ``x [..., d]`` (the equation in the module docstring)."""
        dic = self.dictionaries[site]
        xf = x.float() if x.dtype not in (torch.float32, torch.float64) else x
        f = dic.encode(xf)
        idx = torch.tensor(self.flagged[site], device=f.device)
        f_new = f.clone()
        if site in self.values:
            f_new[..., idx] = self.values[site].to(f.device, f.dtype)
        else:
            f_new[..., idx] = 0
        out = dic.decode(f_new) + (xf - dic.decode(f))
        return out.to(x.dtype)

    def __enter__(self) -> EditedModel:
        if self._handles:
            raise RuntimeError("This edited model is already active: leave the outer `with` block first.")
        for site in self._sites:
            module = get_module(self.model.hf, site.module)
            if site.hook == "input":
                def pre(mod, args, kwargs=None, site=site.name):
                    return (self.edit(site, args[0]), *args[1:])
                self._handles.append(module.register_forward_pre_hook(pre))
            else:
                def post(mod, args, out, site=site.name):
                    if isinstance(out, tuple):
                        return (self.edit(site, out[0]), *out[1:])
                    return self.edit(site, out)
                self._handles.append(module.register_forward_hook(post))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ use

    @torch.no_grad()
    def probe_logits(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> Tensor:
        """The probe's logits ``[n]`` on ``texts`` under the edit (inside or outside ``with``)."""
        from ablation.shift.probe import pooled_activations

        if self.probe is None or self.probe_layer is None:
            raise ValueError("This edited model has no probe: pass probe= and probe_layer= to use it as a classifier.")
        if self._handles:  # already inside `with self:`
            x = pooled_activations(self.model, texts, self.probe_layer, batch_size, progress)
        else:
            with self:
                x = pooled_activations(self.model, texts, self.probe_layer, batch_size, progress)
        return self.probe(x)[:, 0]

    # ------------------------------------------------------------------ disk

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``edit.json`` and ``tensors.safetensors`` to ``folder`` (atomically, as one folder)."""
        folder = Path(folder)
        tensors: dict[str, Tensor] = {f"values.{s}": v.contiguous() for s, v in self.values.items()}
        if self.probe is not None:
            tensors["probe.weight"] = self.probe.weight.detach().float().contiguous().cpu()
            tensors["probe.bias"] = self.probe.bias.detach().float().contiguous().cpu()
        doc = {
            "format": EDIT_FORMAT, "version": 1, "model": self.model.name,
            "flagged": self.keys, "dictionaries": {s: self.dictionary_ids.get(s) for s in self.flagged},
            "probe_layer": self.probe_layer, "info": self.info,
        }
        with atomic_dir(folder) as tmp:
            atomic_write_text(tmp / "edit.json", json.dumps(doc, indent=1))
            save_file(tensors or {"empty": torch.zeros(0)}, str(tmp / "tensors.safetensors"))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, model: SFCModel, dictionaries: Mapping[str, Dictionary]) -> EditedModel:
        """Read a saved edit and check it against ``model`` and ``dictionaries``."""
        folder = Path(folder)
        meta_path = folder / "edit.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"No edited model at {folder} (edit.json missing): give a folder written by "
                                    "EditedModel.save.")
        doc = json.loads(meta_path.read_text(encoding="utf-8"))
        if doc.get("format") != EDIT_FORMAT:
            raise ValueError(f"{meta_path} is not an edited-model file (format {doc.get('format')!r}).")
        from circuits.flags import flags_from_document

        flags = flags_from_document(doc["flagged"], str(meta_path))
        ids = {s: i for s, i in (doc.get("dictionaries") or {}).items() if i is not None}
        flags = FeatureFlags(flags.flagged, model=doc.get("model"), dictionaries=ids, source=str(meta_path))
        flags.check({s: d.width for s, d in dictionaries.items()}, model=model.name,
                    dictionary_ids=getattr(dictionaries, "ids", None))
        tensors = load_file(str(folder / "tensors.safetensors"))
        probe = None
        if "probe.weight" in tensors:
            w = tensors["probe.weight"]
            probe = nn.Linear(w.shape[1], 1)
            probe.weight.data.copy_(w)
            probe.bias.data.copy_(tensors["probe.bias"])
            probe.requires_grad_(False)
        values = {k.removeprefix("values."): v for k, v in tensors.items() if k.startswith("values.")}
        return cls(model, dictionaries, flags.flagged, values=values, probe=probe,
                   probe_layer=doc.get("probe_layer"), dictionary_ids=ids, info=doc.get("info"))
