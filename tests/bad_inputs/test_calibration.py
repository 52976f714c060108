"""Bad calibration data, non-finite weights/inputs and bad adapter files: clear errors, nothing changed.

Every calibrated method is run through `fxforge.compile` on two small models built here (an MLP
taking floats, a token model taking ids), with calibration that is empty, exhausted, wrongly
shaped or typed, out of vocabulary or not finite. Each case asserts the error class, a fragment
of its message, the pass and batch it names, and that the user's model is unchanged. Adapter
files are corrupted one way each; a failed `load_adapters` must leave every parameter as it was.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import fxforge
from fxforge.adapters_io import AdapterLoadError, load_adapters, save_adapters
from fxforge.errors import CalibrationError, FxforgeError, InputError, PassError
from fxforge.passes.registry import get_pass_class

# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    """x (batch, 32) float -> (batch, 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TokenModel(nn.Module):
    """input_ids (batch, seq) int64 in [0, 40) -> logits (batch, seq, 40)."""

    VOCAB = 40

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(self.VOCAB, 32)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)
        self.lm_head = nn.Linear(32, self.VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.fc2(torch.relu(self.fc1(self.embed(input_ids)))))


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def _token_model() -> TokenModel:
    torch.manual_seed(0)
    return TokenModel().eval()


def _x(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 32, generator=torch.Generator().manual_seed(seed))


def _ids(batch: int = 2, seq: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TokenModel.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _mse(outputs: list, inputs: list) -> torch.Tensor:
    return outputs[0].float().pow(2).mean()


# --------------------------------------------------------------------------- calibrated methods

# label -> (pass name, options, extras); every calibrated method fxforge has
METHODS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "gptq": ("quantize", {"bits": 4, "group_size": 32, "method": "gptq"}, {}),
    "awq": ("quantize", {"bits": 4, "group_size": 32, "method": "awq"}, {}),
    "quantize_fp": ("quantize_fp", {"fmt": "e4m3", "group_size": 32}, {}),
    "bcq_calibrated": ("shift_add", {"bits": 2, "group_size": 32, "method": "bcq_calibrated"}, {}),
    "wanda": ("sparsify", {"method": "wanda"}, {}),
    "dsnot": ("sparsify", {"method": "dsnot"}, {}),
    "flap": ("prune", {"method": "flap", "ratio": 0.25}, {}),
    "wanda_sp": ("prune", {"method": "wanda_sp", "ratio": 0.25}, {}),
    "eva": ("add_adapters", {"method": "eva", "rank": 4, "targets": ("fc1", "fc2")}, {}),
    "lora_ga": ("add_adapters", {"method": "lora_ga", "rank": 4, "targets": ("fc1", "fc2")}, {"loss_fn": _mse}),
    "lora_sb": ("add_adapters", {"method": "lora_sb", "rank": 4, "targets": ("fc1", "fc2")}, {"loss_fn": _mse}),
}


def _pass(label: str):
    name, options, _ = METHODS[label]
    return get_pass_class(name)(**options)


def _compile(model: nn.Module, example: tuple, label: str, calibration: Any) -> Any:
    return fxforge.compile(model, example, passes=[_pass(label)], calibration=calibration,
                           extras=dict(METHODS[label][2]))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def _expect(model: nn.Module, example: tuple, label: str, calibration: Any, fragment: str,
            batch: int | None) -> CalibrationError:
    before = _state(model)
    with pytest.raises(CalibrationError, match=fragment) as info:
        _compile(model, example, label, calibration)
    err = info.value
    assert err.pass_name == METHODS[label][0]
    assert err.batch == batch
    if label != "quantize_fp":  # the reader's method is in the message (quantize_fp's is 'search')
        assert METHODS[label][1].get("method", label) in str(err)
    _assert_same_state(model, before)
    return err


# --------------------------------------------------------------------------- empty, exhausted


@pytest.mark.parametrize("label", sorted(METHODS))
def test_empty_calibration_names_the_pass(label):
    err = _expect(_mlp(), (_x(),), label, [], r"got no calibration batches.*pass calibration=\[", None)
    assert "beyond its tolerance" not in str(err)
    assert isinstance(err, PassError)  # also the pass family: the pass was rolled back


@pytest.mark.parametrize("label", ["gptq", "wanda", "eva", "bcq_calibrated"])
def test_an_exhausted_generator_is_reported_as_empty(label):
    model = _mlp()
    gen = (_x(seed=i) for i in range(2))
    _compile(model, (_x(),), label, gen)  # reads it to the end
    _expect(model, (_x(),), label, gen, r"got no calibration batches.*generator already consumed", None)


@pytest.mark.parametrize("label", ["gptq", "awq", "flap", "lora_ga"])
def test_missing_calibration_names_the_option(label):
    model = _mlp()
    before = _state(model)
    with pytest.raises(CalibrationError, match=r"needs calibration data.*pass calibration=") as info:
        _compile(model, (_x(),), label, None)
    assert info.value.pass_name == METHODS[label][0] and info.value.batch is None
    _assert_same_state(model, before)


# --------------------------------------------------------------------------- bad batches
# (method, bad item at batch 1, message fragment): each kind of mistake on a different method,
# so that every calibrated method meets at least one bad batch after a good one

BAD_BATCHES: list[tuple[str, Callable[[], Any], str]] = [
    ("gptq", lambda: _x()[:, :16], r"input 'x' must have shape .*got \(4, 16\): dimension 1 must be 32"),
    ("awq", lambda: _x().double(), r"input 'x' must be torch.float32, got torch.float64"),
    ("quantize_fp", lambda: _x()[None], r"input 'x' must have rank 2.*got shape \(1, 4, 32\)"),
    ("bcq_calibrated", lambda: torch.full((4, 32), float("nan")), r"input 'x' contains 128 NaN"),
    ("wanda", lambda: _x().index_fill(0, torch.tensor([1]), float("inf")), r"input 'x' contains 32 \+inf"),
    ("dsnot", lambda: {"y": _x()}, r"lacks input\(s\) \['x'\]"),
    ("flap", lambda: "not a tensor", r"is a str; an item must be a tensor"),
    ("wanda_sp", lambda: (_x(), _x()), r"has 2 input\(s\) but the model takes 1"),
    ("eva", lambda: (_x().numpy(),), r"input 'x' must be a tensor.*got ndarray"),
    ("lora_ga", lambda: _x().half(), r"must be torch.float32, got torch.float16"),
    ("lora_sb", lambda: {"x": _x()[:, :8]}, r"dimension 1 must be 32"),
]


@pytest.mark.parametrize("label,bad,fragment", BAD_BATCHES, ids=[c[0] for c in BAD_BATCHES])
def test_a_bad_batch_names_the_pass_the_batch_and_the_input(label, bad, fragment):
    _expect(_mlp(), (_x(),), label, [_x(seed=2), bad()], rf"calibration batch 1 .*{fragment}", 1)


@pytest.mark.parametrize("label", ["gptq", "wanda", "eva"])
@pytest.mark.parametrize("ids,fragment", [
    (lambda: _ids().index_fill(1, torch.tensor([3]), TokenModel.VOCAB), r"token ids in \[\d+, 40\].*40 rows"),
    (lambda: _ids().index_fill(1, torch.tensor([0]), -1), r"token ids in \[-1, \d+\]"),
], ids=["past_vocab", "negative"])
def test_token_ids_outside_the_vocabulary(label, ids, fragment):
    _expect(_token_model(), (_ids(),), label, [_ids(seed=3), ids()], rf"batch 1 input 'input_ids' holds {fragment}", 1)


def test_sizes_that_must_agree_are_checked_together():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * mask

    model = TwoInputs().eval()
    good = {"x": _x(), "mask": torch.ones(4, 32)}
    bad = {"x": _x(), "mask": torch.ones(3, 32)}
    before = _state(model)
    with pytest.raises(CalibrationError, match=r"batch 1 input 'mask' must have shape .*got \(3, 32\): dimension 0 \(s\d+\) must equal dimension 0 of 'x' .*which is 4"):
        fxforge.compile(model, (), good, passes=[_pass("gptq")], calibration=[good, bad])
    _assert_same_state(model, before)


# --------------------------------------------------------------------------- positives


def test_a_generator_shared_by_two_calibrated_passes_feeds_both_and_is_read_once():
    reads = []

    def batches():
        for i in range(3):
            reads.append(i)
            yield _x(seed=10 + i)

    model = _mlp()
    compiled = fxforge.compile(model, (_x(),), passes=[_pass("wanda"), _pass("gptq")], calibration=batches())
    assert compiled.report.pipeline["sparsify"].sites == 3
    assert compiled.report.pipeline["quantize"].sites >= 2
    assert reads == [0, 1, 2]  # each item read from the generator once, though two passes used all


def test_calibration_that_is_not_an_iterable_of_batches_is_refused_up_front():
    model = _mlp()
    with pytest.raises(CalibrationError, match=r"got a Tensor \(one batch: wrap it in a list"):
        fxforge.compile(model, (_x(),), passes=[_pass("gptq")], calibration=_x())
    with pytest.raises(CalibrationError, match="got a int"):
        fxforge.compile(model, (_x(),), passes=[_pass("gptq")], calibration=3)


def test_nan_in_a_weight_is_named_not_blamed_on_canonicalize():
    model = _mlp()
    with torch.no_grad():
        model.fc2.weight[3, 5] = float("nan")
        model.fc2.weight[0, 0] = float("inf")
    with pytest.raises(InputError, match=r"parameter 'fc2.weight' of the model contains 1 NaN and 1 \+inf") as info:
        fxforge.compile(model, (_x(),))
    assert "canonicalize" not in str(info.value)


@pytest.mark.parametrize("value,fragment", [(float("nan"), "1 NaN"), (float("inf"), r"1 \+inf")])
def test_non_finite_example_inputs_are_named(value, fragment):
    x = _x()
    x[2, 7] = value
    with pytest.raises(InputError, match=rf"example input args\[0\] contains {fragment}"):
        fxforge.compile(_mlp(), (x,))


def test_negative_infinity_in_an_additive_mask_is_allowed():
    class Masked(nn.Module):
        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x + bias, dim=-1)

    bias = torch.zeros(4, 32)
    bias[:, -1] = float("-inf")
    compiled = fxforge.compile(Masked(), (_x(), bias))
    assert torch.isfinite(compiled(_x(), bias)).all()


# --------------------------------------------------------------------------- adapter files


def _adapted(seed: int) -> Any:
    """An eager CompiledModel with LoRA on fc1, fc2 and random (non-zero) adapters."""
    compiled = fxforge.compile(_mlp(), (_x(),), passes=[get_pass_class("add_adapters")(rank=4, targets=("fc1", "fc2"))])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in compiled.graph_module.named_parameters():
            if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return compiled


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapters") / "good.safetensors"
    save_adapters(_adapted(seed=1), path)
    with safe_open(str(path), framework="pt") as f:
        return path, {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _with(tensors: dict, **changes: Any) -> dict:
    out = dict(tensors)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            out.pop(key)
        else:
            out[key] = value(out.get(key))
    return out


def _nan_at_0(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


BAD_FILES: list[tuple[str, Callable[[dict], dict], str]] = [
    ("unknown_name", lambda t: _with(t, fc3__lora_A=lambda _: torch.zeros(4, 64)),
     r"no adapter of the graph takes: fc3.lora_A"),
    ("missing_name", lambda t: _with(t, fc2__lora_B=None), r"fc2.lora_B: missing from the file"),
    ("wrong_shape", lambda t: _with(t, fc2__lora_A=lambda a: a[:, :63].contiguous()),
     r"fc2.lora_A: shape \(4, 63\) in the file but \(4, 64\) in the graph"),
    ("int8", lambda t: _with(t, fc1__lora_B=lambda b: (b * 100).to(torch.int8)),
     r"fc1.lora_B: dtype torch.int8 in the file but torch.float32 in the graph \(no cast"),
    ("fp16", lambda t: _with(t, fc2__lora_B=lambda b: b.half()),
     r"fc2.lora_B: dtype torch.float16 in the file but torch.float32"),
    ("nan", lambda t: _with(t, fc2__lora_B=_nan_at_0), r"fc2.lora_B: contains 1 NaN"),
    ("inf", lambda t: _with(t, fc1__lora_A=lambda a: a.index_fill(0, torch.tensor([0]), float("-inf"))),
     r"fc1.lora_A: contains 32 -inf \(of 128 values\)"),
]


@pytest.mark.parametrize("case,corrupt,fragment", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_a_bad_adapter_file_changes_nothing(adapter_file, tmp_path, case, corrupt, fragment):
    good_path, tensors, metadata = adapter_file
    bad_path = tmp_path / f"{case}.safetensors"
    save_file(corrupt(tensors), str(bad_path), metadata=metadata)
    target = _adapted(seed=2)
    before = {n: p.detach().clone() for n, p in target.graph_module.named_parameters()}
    output = target(_x())
    with pytest.raises(AdapterLoadError, match=fragment):
        load_adapters(target, bad_path)
    after = dict(target.graph_module.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(before[n], after[n]) for n in before), "a parameter changed"
    assert torch.equal(target(_x()), output)
    assert load_adapters(target, good_path) == ["fc1", "fc2"]  # the good file still loads into it


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\xff" * 64],
                         ids=["empty", "text", "garbage"])
def test_a_file_that_is_not_safetensors_is_refused(tmp_path, content):
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(content)
    target = _adapted(seed=2)
    before = {n: p.detach().clone() for n, p in target.graph_module.named_parameters()}
    with pytest.raises(AdapterLoadError, match="is not a readable safetensors file"):
        load_adapters(target, path)
    assert all(torch.equal(before[n], p) for n, p in target.graph_module.named_parameters())


def test_save_adapters_is_atomic(tmp_path, monkeypatch):
    import fxforge.adapters_io as adapters_io

    path = tmp_path / "adapter.safetensors"
    save_adapters(_adapted(seed=1), path)
    good = path.read_bytes()

    def crash(tensors, filename, metadata=None):  # dies halfway through writing
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(adapters_io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(_adapted(seed=3), path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]  # no temp sibling left


def test_save_adapters_refuses_non_finite_adapters(tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_adapters(_adapted(seed=1), path)
    good = path.read_bytes()
    broken = _adapted(seed=3)
    with torch.no_grad():
        dict(broken.graph_module.named_parameters())["fc1.lora_B"][0, 0] = float("nan")
    with pytest.raises(FxforgeError, match=r"(?s)non-finite adapter tensors.*fc1.lora_B contains 1 NaN"):
        save_adapters(broken, path)
    assert path.read_bytes() == good


def test_the_users_model_is_untouched_by_a_failed_compile_with_nan_calibration():
    model = _mlp()
    reference = copy.deepcopy(model)
    with pytest.raises(CalibrationError):
        _compile(model, (_x(),), "gptq", [torch.full((4, 32), float("nan"))])
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name
