"""Dictionary files (SPEC §8) written by hand in each layout, loaded back, and
checked against the encode/decode formulas written out here:

- dictionary_learning ReLU: ``f = relu(W_E (x - b_D) + b_E)``, ``x_hat = W_D f + b_D``;
- TopK: the same pre-activation, keeping the ``k`` largest ReLU values;
- JumpReLU (Gemma Scope, no ``b_dec`` subtraction): ``pre = x @ W_enc + b_enc``,
  ``f = pre * (pre > threshold)``, ``x_hat = f @ W_dec + b_dec``.

Also: save/load round trips, files are never unpickled, corrupt or missing
files raise :class:`DictionaryFileError`, the identity dictionary, sparsity
calibration and shape validation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from attribution.dictionaries.formats import DictionaryFileError, load_dictionary, save_dictionary
from attribution.dictionaries.kinds import SAE, Identity, calibrate_sparsity, random_sae

D, F = 6, 10  # d != F, so a transposed weight cannot pass unnoticed


def params(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random parameters in the Gemma Scope / SAELens orientation: W_enc [d, F], W_dec [F, d]."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D, F, generator=gen),
        "b_enc": 0.3 * torch.randn(F, generator=gen),
        "W_dec": torch.randn(F, D, generator=gen),
        "b_dec": 0.5 * torch.randn(D, generator=gen),
        "threshold": 0.2 + 0.5 * torch.rand(F, generator=gen),
    }


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 4, D, generator=torch.Generator().manual_seed(seed))


def relu_formula(p, x, subtract=True):
    pre = ((x - p["b_dec"]) if subtract else x) @ p["W_enc"] + p["b_enc"]
    return torch.relu(pre)


def topk_formula(p, x, k, subtract=True):
    post = relu_formula(p, x, subtract)
    kth = post.sort(dim=-1, descending=True).values[..., k - 1 : k]
    return torch.where(post >= kth, post, torch.zeros_like(post))


def jumprelu_formula(p, x, subtract=False):
    pre = ((x - p["b_dec"]) if subtract else x) @ p["W_enc"] + p["b_enc"]
    return pre * (pre > p["threshold"])


def decode_formula(p, f):
    return f @ p["W_dec"] + p["b_dec"]


def check(sae, p, x, f_truth):
    f = sae.encode(x)
    assert (f != 0).any() and (f == 0).any()
    torch.testing.assert_close(f, f_truth, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae.decode(f), decode_formula(p, f_truth), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.error(x), x - decode_formula(p, f_truth), rtol=1e-5, atol=1e-5)


def write_config(folder: Path, name: str, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(config))


# dictionary_learning: ae.pt + config.json -------------------------------------------------


def test_dictionary_learning_relu_autoencoder_matches_the_formula(tmp_path):
    p = params()
    torch.save({
        "encoder.weight": p["W_enc"].T.contiguous(),  # nn.Linear(d, F).weight is [F, d]
        "encoder.bias": p["b_enc"],
        "decoder.weight": p["W_dec"].T.contiguous(),  # nn.Linear(F, d).weight is [d, F]
        "bias": p["b_dec"],
    }, tmp_path / "ae.pt")
    write_config(tmp_path, "config.json", {"trainer": {"dict_class": "AutoEncoder", "activation_dim": D,
                                                       "dict_size": F}})
    sae = load_dictionary(tmp_path)
    assert (sae.d, sae.width, sae.activation) == (D, F, "relu")
    check(sae, p, inputs(), relu_formula(p, inputs()))


@pytest.mark.parametrize("k_in", ["state", "config"])
def test_dictionary_learning_topk_autoencoder_matches_the_formula(tmp_path, k_in):
    p, k = params(), 3
    state = {"encoder.weight": p["W_enc"].T.contiguous(), "encoder.bias": p["b_enc"],
             "decoder.weight": p["W_dec"].T.contiguous(), "b_dec": p["b_dec"]}
    trainer = {"dict_class": "AutoEncoderTopK", "activation_dim": D, "dict_size": F}
    if k_in == "state":
        state["k"] = torch.tensor(k)
    else:
        trainer["k"] = k
    torch.save(state, tmp_path / "ae.pt")
    write_config(tmp_path, "config.json", {"trainer": trainer})
    sae = load_dictionary(tmp_path)
    assert (sae.activation, sae.k) == ("topk", k)
    f = sae.encode(inputs())
    assert ((f != 0).sum(-1) <= k).all()
    check(sae, p, inputs(), topk_formula(p, inputs(), k))


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_dictionary_learning_jumprelu_autoencoder_matches_the_formula(tmp_path, apply_b_dec):
    p = params()
    torch.save(p, tmp_path / "ae.pt")
    trainer = {"dict_class": "JumpReluAutoEncoder", "activation_dim": D, "dict_size": F}
    if apply_b_dec:
        trainer["apply_b_dec_to_input"] = True
    write_config(tmp_path, "config.json", {"trainer": trainer})
    sae = load_dictionary(tmp_path)
    assert sae.activation == "jumprelu"
    check(sae, p, inputs(), jumprelu_formula(p, inputs(), subtract=apply_b_dec))


# SAELens: cfg.json + sae_weights.safetensors ---------------------------------------------


def write_saelens(folder: Path, p: dict, cfg: dict) -> None:
    keys = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if cfg.get("architecture") == "jumprelu" else [])
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: p[k].contiguous() for k in keys}, str(folder / "sae_weights.safetensors"))
    write_config(folder, "cfg.json", {"d_in": D, "d_sae": F, "normalize_activations": "none", **cfg})


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_standard_sae_matches_the_relu_formula(tmp_path, apply_b_dec):
    p = params()
    write_saelens(tmp_path, p, {"architecture": "standard", "activation_fn_str": "relu",
                                "apply_b_dec_to_input": apply_b_dec})
    sae = load_dictionary(tmp_path)
    assert sae.activation == "relu"
    check(sae, p, inputs(), relu_formula(p, inputs(), subtract=apply_b_dec))


@pytest.mark.parametrize("where", ["activation_fn_kwargs", "top_level"])
def test_saelens_topk_sae_matches_the_formula(tmp_path, where):
    p, k = params(), 4
    cfg = {"architecture": "topk", "apply_b_dec_to_input": True}
    cfg.update({"activation_fn_kwargs": {"k": k}} if where == "activation_fn_kwargs" else {"k": k})
    write_saelens(tmp_path, p, cfg)
    sae = load_dictionary(tmp_path)
    assert (sae.activation, sae.k) == ("topk", k)
    check(sae, p, inputs(), topk_formula(p, inputs(), k))


def test_saelens_jumprelu_sae_matches_the_gemma_scope_formula(tmp_path):
    p = params()
    write_saelens(tmp_path, p, {"architecture": "jumprelu", "apply_b_dec_to_input": False})
    sae = load_dictionary(tmp_path)
    assert sae.activation == "jumprelu"
    check(sae, p, inputs(), jumprelu_formula(p, inputs()))


@pytest.mark.parametrize("option", [{"normalize_activations": "expected_average_only_in"},
                                    {"finetuning_scaling_factor": True}])
def test_saelens_options_that_change_the_formula_are_refused(tmp_path, option):
    write_saelens(tmp_path, params(), {"architecture": "standard", **option})
    with pytest.raises(DictionaryFileError, match="not supported"):
        load_dictionary(tmp_path)


# Gemma Scope: params.npz -----------------------------------------------------------------


@pytest.mark.parametrize("by", ["file", "folder"])
def test_gemma_scope_params_npz_matches_the_jumprelu_formula(tmp_path, by):
    p = params()
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in p.items()})
    sae = load_dictionary(tmp_path / "params.npz" if by == "file" else tmp_path)
    assert (sae.d, sae.width, sae.activation, sae.subtract_decoder_bias) == (D, F, "jumprelu", False)
    x = inputs()
    f = sae.encode(x)
    # Below threshold nothing fires, even where the pre-activation is positive.
    pre = x @ p["W_enc"] + p["b_enc"]
    assert ((pre > 0) & (pre <= p["threshold"]) & (f == 0)).any()
    check(sae, p, x, jumprelu_formula(p, x))


# Round trips -----------------------------------------------------------------------------


def assert_same_encoding(a: SAE, b: SAE) -> None:
    """Bit-equal parameters, and equal encode/decode up to matmul rounding (the layouts differ)."""
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(b, name), getattr(a, name)), name
    x = torch.randn(50, a.d, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(b.encode(x), a.encode(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.decode(a.encode(x)), a.decode(a.encode(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_save_then_load_gives_the_same_dictionary(tmp_path, activation):
    sae = calibrate_sparsity(random_sae(8, 24, activation, seed=2), torch.randn(200, 8), 4)
    save_dictionary(sae, tmp_path / "d", metadata={"site": "resid_0"})
    loaded = load_dictionary(tmp_path / "d")
    assert (loaded.activation, loaded.k, loaded.d, loaded.width) == (activation, sae.k, 8, 24)
    assert json.loads((tmp_path / "d" / "config.json").read_text())["sfc"] == {"site": "resid_0"}
    assert_same_encoding(sae, loaded)


def test_save_then_load_gives_the_same_jumprelu_dictionary_without_b_dec_subtraction(tmp_path):
    p = params()
    sae = SAE(p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], "jumprelu", threshold=p["threshold"],
              subtract_decoder_bias=False)
    save_dictionary(sae, tmp_path / "d")
    assert_same_encoding(sae, load_dictionary(tmp_path / "d"))


def test_save_then_load_gives_the_same_jumprelu_dictionary_with_b_dec_subtraction(tmp_path):
    sae = calibrate_sparsity(random_sae(8, 24, "jumprelu", seed=2), torch.randn(200, 8), 4)
    assert sae.subtract_decoder_bias
    save_dictionary(sae, tmp_path / "d")
    assert_same_encoding(sae, load_dictionary(tmp_path / "d"))


def test_a_relu_sae_without_b_dec_subtraction_cannot_be_saved_as_dictionary_learning(tmp_path):
    p = params()
    sae = SAE(p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], "relu", subtract_decoder_bias=False)
    with pytest.raises(ValueError, match="subtracts the decoder bias"):
        save_dictionary(sae, tmp_path / "d")


# Files are never unpickled; bad files raise DictionaryFileError ---------------------------

MARKER: list[str] = []


def _record_execution(note: str) -> str:
    MARKER.append(note)
    return note


class Payload:
    """Unpickling this object would call _record_execution."""

    def __reduce__(self):
        return (_record_execution, ("executed",))


@dataclass
class Weights:
    W_enc: torch.Tensor


@pytest.mark.parametrize("obj", ["payload", "dataclass"])
def test_a_pickled_object_in_ae_pt_is_refused_without_running_it(tmp_path, obj):
    MARKER.clear()
    payload = {"encoder.weight": Payload()} if obj == "payload" else Weights(torch.zeros(D, F))
    torch.save(payload, tmp_path / "ae.pt")
    write_config(tmp_path, "config.json", {"trainer": {"dict_class": "AutoEncoder"}})
    with pytest.raises(DictionaryFileError, match="not a plain state dict"):
        load_dictionary(tmp_path)
    assert MARKER == []


def test_a_truncated_ae_pt_raises_a_clear_error(tmp_path):
    save_dictionary(random_sae(8, 24), tmp_path)
    data = (tmp_path / "ae.pt").read_bytes()
    (tmp_path / "ae.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DictionaryFileError, match=r"ae\.pt is corrupt.*re-download"):
        load_dictionary(tmp_path)


def test_a_corrupt_config_json_raises_a_clear_error(tmp_path):
    save_dictionary(random_sae(8, 24), tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DictionaryFileError, match="Cannot read"):
        load_dictionary(tmp_path)


def test_a_missing_folder_raises_a_clear_error(tmp_path):
    with pytest.raises(DictionaryFileError, match="No dictionary at"):
        load_dictionary(tmp_path / "nowhere")


def test_a_folder_of_unknown_layout_raises_a_clear_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(DictionaryFileError, match="no known dictionary layout"):
        load_dictionary(tmp_path)


def test_a_missing_params_npz_raises_a_dictionary_file_error(tmp_path):
    with pytest.raises(DictionaryFileError):
        load_dictionary(tmp_path / "params.npz")


def test_an_ae_pt_with_unknown_keys_raises_a_dictionary_file_error(tmp_path):
    torch.save({"weight": torch.zeros(D, F)}, tmp_path / "ae.pt")
    with pytest.raises(DictionaryFileError):
        load_dictionary(tmp_path)


# Identity, random SAEs, validation -------------------------------------------------------


def test_identity_dictionary_encodes_and_decodes_to_itself_with_zero_error():
    ident = load_dictionary("identity:7")
    assert isinstance(ident, Identity) and ident.d == ident.width == 7
    x = torch.randn(2, 3, 7)
    assert torch.equal(ident.encode(x), x)
    assert torch.equal(ident.decode(x), x)
    assert torch.equal(ident.error(x), torch.zeros_like(x))
    torch.testing.assert_close(ident.decode(ident.encode(x)), x @ ident.W_dec + ident.b_dec)


@pytest.mark.parametrize("target", [2.0, 6.0, 20.0])
def test_calibrated_random_sae_fires_about_target_l0_features(target):
    d, width = 16, 128
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(d, d, generator=gen)
    train, test = (torch.randn(4000, d, generator=gen) @ mix for _ in range(2))
    sae = calibrate_sparsity(random_sae(d, width, seed=1), train, target)
    l0_train = (sae.encode(train) > 0).sum(-1).float().mean().item()
    l0_test = (sae.encode(test) > 0).sum(-1).float().mean().item()
    assert abs(l0_train - target) <= 0.02 * target + 0.05
    assert abs(l0_test - target) <= 0.15 * target


def test_random_topk_sae_fires_exactly_k_features():
    sae = random_sae(16, 64, "topk", k=5, seed=0)
    f = sae.encode(torch.randn(100, 16) * 10)
    assert ((f > 0).sum(-1) == 5).all()


def test_random_sae_has_unit_norm_decoder_rows():
    sae = random_sae(16, 64, seed=0)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))


@pytest.mark.parametrize("bad", ["W_dec", "b_enc", "b_dec"])
def test_inconsistent_sae_shapes_are_refused(bad):
    p = params()
    p[bad] = p[bad].T if bad == "W_dec" else p[bad][:-1]
    with pytest.raises(ValueError, match="Inconsistent SAE shapes"):
        SAE(p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"])


def test_topk_without_k_and_jumprelu_without_threshold_are_refused():
    p = params()
    common = (p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"])
    with pytest.raises(ValueError, match="needs k"):
        SAE(*common, "topk")
    with pytest.raises(ValueError, match="needs a threshold"):
        SAE(*common, "jumprelu")
