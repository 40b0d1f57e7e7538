"""Metrics: functions ``metric(logits, rows) -> [n]`` that node and edge effects are
taken on (SPEC §2.4); see :data:`attribution.model.tracing.Metric` for the contract."""

from __future__ import annotations

import torch
from torch import Tensor

from attribution.model.tracing import Metric


def logit_diff(good_ids: Tensor, bad_ids: Tensor) -> Metric:
    """``m = logit[good] - logit[bad]`` at the last position, per row (SPEC §2.4).

    For discovery the reference uses ``good = patch answers, bad = clean
    answers``, so that patching raises m; evaluation swaps them. Inputs are
    left-padded, so position -1 is each row's last real token.
    """
    good_ids, bad_ids = torch.as_tensor(good_ids).long(), torch.as_tensor(bad_ids).long()

    def metric(logits: Tensor, rows: Tensor) -> Tensor:
        last = logits[:, -1, :]
        rows = rows.to(last.device)
        good = good_ids.to(last.device)[rows]
        bad = bad_ids.to(last.device)[rows]
        return last.gather(1, good[:, None])[:, 0] - last.gather(1, bad[:, None])[:, 0]

    return metric


def neg_log_prob(answer_ids: Tensor) -> Metric:
    """``m = -log p(answer)`` at the last position, per row (paper's metric for unpaired data)."""
    answer_ids = torch.as_tensor(answer_ids).long()

    def metric(logits: Tensor, rows: Tensor) -> Tensor:
        logp = torch.log_softmax(logits[:, -1, :].float(), dim=-1)
        ans = answer_ids.to(logp.device)[rows.to(logp.device)]
        return -logp.gather(1, ans[:, None])[:, 0].to(logits.dtype)

    return metric


__all__ = ["Metric", "logit_diff", "neg_log_prob"]
