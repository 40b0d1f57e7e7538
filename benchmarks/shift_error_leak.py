"""Analysis: how much of the spurious signal SHIFT leaves in the SAE error at the probe layer.

On the synthetic professor/nurse set and the cached default SmolLM2 dictionaries,
at the probe layer's site ``resid_ℓ`` only (so ablation is closed-form in pooled
space: ``pool(x) - pool(f)[:, F] @ W_dec[F]``):

- ``gender_from_error_acc`` / ``profession_from_error_acc``: a probe trained on the
  pooled SAE error ``x - decode(encode(x))`` of the balanced train bios, scored on
  the balanced test bios;
- for the features the proxy judge's rule flags (``ablation.shift.judge.verdicts``:
  gender AUROC ≥ 0.6 and above the profession AUROC + 0.05, on balanced train), the retrained probe's
  accuracies with the error kept (SHIFT) and with the error removed too.

Prints one JSON object. Usage: ``PYTHONPATH=. python benchmarks/shift_error_leak.py [--layer 6]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from ablation.shift.data import synthetic_splits  # noqa: E402
from ablation.shift.judge import verdicts  # noqa: E402
from ablation.shift.probe import (  # noqa: E402
    MEASURES,
    ProbeConfig,
    accuracies,
    pool,
    predict,
    probe_model,
    train_probe,
)
from attribution.dictionaries.sets import load_dictionaries  # noqa: E402
from attribution.model import tracing  # noqa: E402
from attribution.model.loading import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--n-train", type=int, default=150)
    ap.add_argument("--n-test", type=int, default=100)
    args = ap.parse_args()
    model = load_model("smollm2-135m")
    site = f"resid_{args.layer}"
    sae = load_dictionaries(model)[site]
    splits = synthetic_splits(args.n_train, args.n_test, 0)
    cut = probe_model(model, args.layer)
    site_obj = cut.sites([site])

    @torch.no_grad()
    def pooled(texts):
        xs, cs, es = [], [], []
        for start in range(0, len(texts), 32):
            batch = cut.tokenize(texts[start : start + 32])
            x = tracing.run(cut, batch, site_obj, None, torch.arange(len(batch))).acts[site].float()
            f = sae.encode(x)
            for out, v in ((xs, x), (cs, f), (es, x - sae.decode(f))):
                out.append(pool(v, batch.attention_mask))
        return torch.cat(xs), torch.cat(cs), torch.cat(es)

    amb, bal, test = splits.ambiguous_train, splits.balanced_train, splits.balanced_test
    (xa, ca, ea), (_xb, cb, eb), (xt, ct, et) = pooled(amb.texts), pooled(bal.texts), pooled(test.texts)
    cfg = ProbeConfig()

    def table(probe, x):
        r = accuracies(predict(probe, x), test.labels, test.spurious)
        return {k: round(r[k], 4) for k in MEASURES}

    def acc(target_train, target_test, x_train, x_test):
        p = train_probe(x_train, target_train, cfg)
        return round(float((predict(p, x_test) == torch.as_tensor(target_test)).float().mean()), 4)

    alive = (cb.abs().sum(0) > 0).nonzero()[:, 0].tolist()
    judged = verdicts(cb[:, alive], [str(j) for j in alive], bal.labels, bal.spurious)
    flagged = [int(v.key) for v in judged if v.flagged]
    w = sae.W_dec.float()[flagged]
    keep = lambda x, c: x - c[:, flagged] @ w  # noqa: E731
    out = {
        "layer": args.layer, "site": site,
        "gender_from_error_acc": acc(bal.spurious, test.spurious, eb, et),
        "profession_from_error_acc": acc(bal.labels, test.labels, eb, et),
        "n_flagged": len(flagged),
        "original": table(train_probe(xa, amb.labels, cfg), xt),
        "retrain_error_kept": table(train_probe(keep(xa, ca), amb.labels, cfg), keep(xt, ct)),
        "retrain_error_removed": table(train_probe(keep(xa, ca) - ea, amb.labels, cfg), keep(xt, ct) - et),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
