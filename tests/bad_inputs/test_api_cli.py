"""Bad input through the Python API, the command line and the pipeline parser (issue 14, items 5-6).

Every case is something a careful new user might do. Each asserts the FxforgeError subclass, a
fragment of its message (the problem or the fix), and that the user's model is unchanged (its
state_dict and its training flag). Models are built and compiled once per module: the whole file
runs in well under a minute on two cores.
"""
from __future__ import annotations

import copy
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxforge
from fxforge.cli import main
from fxforge.errors import BackendError, FxforgeError, InputError, PassError, PassSpecError, TraceError
from fxforge.models import get_model
from fxforge.passes.registry import registered_passes
from fxforge.passes.quantize import Quantize
from fxforge.passes.spec import parse_pipeline


# --------------------------------------------------------------------------- shared models


class TinyLM(torch.nn.Module):
    """Token ids and a mask in, logits out: the shape of a decoder's interface, compiled in a second."""

    def __init__(self, vocab: int = 256, hidden: int = 16):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab, hidden)
        self.proj = torch.nn.Linear(hidden, hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) * attention_mask[..., None].to(torch.float32)
        return self.lm_head(torch.relu(self.proj(hidden)))


@dataclass
class Zoo:
    """The user's models (mlp in training mode, to check the flag survives), compiled once."""

    mlp: torch.nn.Module
    x: torch.Tensor
    llama: torch.nn.Module
    llama_kwargs: dict[str, torch.Tensor]
    compiled_mlp: Any
    compiled_llama: Any
    snapshots: dict[str, tuple[dict[str, torch.Tensor], bool]]


def _snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, model.training


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    mlp_zm = get_model("mlp")
    mlp = mlp_zm.model.train()
    torch.manual_seed(0)
    llama = TinyLM().eval()
    ids = torch.randint(0, 256, (2, 16))
    llama_kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    snapshots = {"mlp": _snapshot(mlp), "llama": _snapshot(llama)}
    return Zoo(mlp=mlp, x=mlp_zm.args[0], llama=llama, llama_kwargs=llama_kwargs,
               compiled_mlp=fxforge.compile(mlp, mlp_zm.args),
               compiled_llama=fxforge.compile(llama, (), llama_kwargs),
               snapshots=snapshots)


def assert_unchanged(zoo: Zoo) -> None:
    for name, model in (("mlp", zoo.mlp), ("llama", zoo.llama)):
        state, training = zoo.snapshots[name]
        assert model.training == training, f"{name}: training flag changed"
        now = model.state_dict()
        assert now.keys() == state.keys(), f"{name}: parameters added or removed"
        for key, value in state.items():
            assert torch.equal(now[key], value), f"{name}: {key} changed"


@pytest.fixture
def no_trace(monkeypatch):
    """Fails the test if compile() gets as far as tracing: argument errors must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("compile() traced the model before rejecting its arguments")

    monkeypatch.setattr(fxforge.api, "trace", refuse)


def raises(zoo: Zoo, error: type[Exception], fragment: str, action: Callable[[], Any]) -> FxforgeError:
    with pytest.raises(error) as info:
        action()
    assert isinstance(info.value, FxforgeError)
    assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"
    assert_unchanged(zoo)
    return info.value


# --------------------------------------------------------------------------- API: arguments


def compile_mlp(**options: Any) -> Callable[[Zoo], Any]:
    return lambda z: fxforge.compile(z.mlp, (z.x,), **options)


# Rejected before tracing (the no_trace fixture checks that): backend, options, tolerance, passes.
ARGUMENT_CASES = {
    "misspelt backend": (compile_mlp(backend="onnxx"), BackendError, "Did you mean 'onnx'?"),
    "unknown backend lists valid ones": (compile_mlp(backend="tensorrt"), BackendError,
                                         "Valid backends: eager, onnx, triton, inductor"),
    "backend not a string": (compile_mlp(backend=None), BackendError, "backend must be a string"),
    "backend_options not a dict": (compile_mlp(backend_options=["threads"]), BackendError,
                                   "backend_options must be a dict"),
    "eager takes no options": (compile_mlp(backend_options={"threads": 2}), BackendError,
                               "The eager backend takes no options"),
    "unknown onnx option": (compile_mlp(backend="onnx", backend_options={"thread": 1}), BackendError,
                            "has no option 'thread'. Valid options: path, threads, spinning"),
    "onnx threads of wrong type": (compile_mlp(backend="onnx", backend_options={"threads": "two"}),
                                   BackendError, "option 'threads' must be int or None, got 'two'"),
    "onnx threads zero": (compile_mlp(backend="onnx", backend_options={"threads": 0}), BackendError,
                          "'threads' must be >= 1"),
    "onnx spinning not bool": (compile_mlp(backend="onnx", backend_options={"spinning": "no"}),
                               BackendError, "option 'spinning' must be bool"),
    "triton takes no options": (compile_mlp(backend="triton", backend_options={"num_warps": 4}),
                                BackendError, "The triton backend takes no options"),
    "unknown inductor option": (compile_mlp(backend="inductor", backend_options={"modee": "max-autotune"}),
                                BackendError, "has no option 'modee'"),
    "tolerance as a string": (compile_mlp(backend_tolerance="1e-3"), BackendError,
                              "backend_tolerance must be a float"),
    "negative tolerance": (compile_mlp(backend_tolerance=-1.0), BackendError, "finite number >= 0"),
    "nan tolerance": (compile_mlp(backend_tolerance=float("nan")), BackendError, "finite number >= 0"),
    "passes an int": (compile_mlp(passes=123), PassSpecError, "passes must be a pipeline string"),
    "passes holds a class": (compile_mlp(passes=[Quantize]), PassSpecError, "instantiate it (Quantize()"),
    "passes holds a number": (compile_mlp(passes=[1]), PassSpecError, "pipeline items must be fxforge passes"),
    "duplicate option": (compile_mlp(passes="quantize(bits=4,bits=8)"), PassSpecError,
                         "option 'bits' of pass 'quantize' is given twice"),
    "unknown option": (compile_mlp(passes="quantize(bitz=4)"), PassSpecError, "has no option 'bitz'"),
    "option of wrong type": (compile_mlp(passes="quantize(bits='four')"), PassSpecError,
                             "option 'bits' of pass 'quantize' must be int"),
    "float for an int option": (compile_mlp(passes="quantize(bits=3.5)"), PassSpecError, "must be int, got 3.5"),
    "option out of range": (compile_mlp(passes="quantize(bits=1)"), PassSpecError, "use an integer from 2 to 8"),
    "misspelt pass": (compile_mlp(passes="quantise"), PassSpecError, "Did you mean 'quantize'"),
    "unclosed bracket": (compile_mlp(passes="quantize(bits=4"), PassSpecError, "unbalanced brackets"),
    "option without a name": (compile_mlp(passes="quantize(4)"), PassSpecError, "must be written key=value"),
    "sparsity out of range": (compile_mlp(passes="sparsify(sparsity=1.5)"), PassSpecError, "[0, 1)"),
    "string for a list option": (compile_mlp(passes="quantize(targets=5)"), PassSpecError,
                                 "option 'targets' of pass 'quantize' must be"),
    "model not a module": (lambda z: fxforge.compile(lambda t: t, (z.x,)), TraceError,
                           "needs a torch.nn.Module, got function"),
    "model class, not instance": (lambda z: fxforge.compile(torch.nn.Linear, (z.x,)), TraceError,
                                  "not its class"),
    "kwargs not a dict": (lambda z: fxforge.compile(z.mlp, (z.x,), [z.x]), TraceError, "kwargs must be a dict"),
    "unknown onnx compute dtype": (lambda z: fxforge.compile(copy.deepcopy(z.mlp).to(torch.bfloat16),
                                                             (z.x.bfloat16(),), backend="onnx",
                                                             backend_options={"dtype": "bf16"}),
                                   BackendError, "option 'dtype' must be one of 'auto', 'float32', 'model'"),
}


@pytest.mark.parametrize("case", list(ARGUMENT_CASES))
def test_bad_argument_fails_before_tracing(case, zoo, no_trace):
    action, error, fragment = ARGUMENT_CASES[case]
    raises(zoo, error, fragment, lambda: action(zoo))


# Reach tracing (the example inputs are what is wrong) or the pipeline (a selection).
TRACE_AND_PASS_CASES = {
    "kwargs for a model that takes none": (lambda z: fxforge.compile(z.mlp, (z.x,), {"foo": z.x}),
                                           TraceError, "unexpected keyword argument 'foo'"),
    "no example inputs": (lambda z: fxforge.compile(z.mlp), TraceError, "missing a required argument: 'x'"),
    "example input a string": (lambda z: fxforge.compile(z.mlp, ("hello",)), TraceError, "not str"),
    "example input of wrong width": (lambda z: fxforge.compile(z.mlp, (z.x[:, :7],)), TraceError,
                                     "could not trace MLP"),
    "quantize targets match nothing": (compile_mlp(passes="quantize(targets=[nope])"), PassError,
                                       "targets pattern 'nope' matches no linear layer. Available: fc1, fc2, fc3"),
    "quantize targets empty": (compile_mlp(passes="quantize(targets=[])"), PassError, "targets is empty"),
    "quantize target misspelt": (compile_mlp(passes="quantize(targets=[fc_1])"), PassError,
                                 "Close matches: fc1"),
    "quantize exclude matches nothing": (compile_mlp(passes="quantize(group_size=-1,exclude=[fc9])"), PassError,
                                         "exclude pattern 'fc9' matches no linear layer"),
    "quantize_dynamic targets": (compile_mlp(passes="quantize_dynamic(targets=[nope])"), PassError,
                                 "pass 'quantize_dynamic': targets pattern 'nope'"),
    "llm_int8 targets": (compile_mlp(passes="llm_int8(targets=[nope])"), PassError,
                         "pass 'llm_int8': targets pattern 'nope'"),
    "quantize_fp targets": (compile_mlp(passes="quantize_fp(targets=[nope])"), PassError,
                            "pass 'quantize_fp': targets pattern 'nope'"),
    "sparsify targets": (compile_mlp(passes="sparsify(method=magnitude,targets=[nope])"), PassError,
                         "pass 'sparsify': targets pattern 'nope'"),
    "sparsify exclude": (compile_mlp(passes="sparsify(method=magnitude,exclude=[fc4])"), PassError,
                         "pass 'sparsify': exclude pattern 'fc4'"),
    "shift_add targets": (compile_mlp(passes="shift_add(targets=[nope])"), PassError,
                          "pass 'shift_add': targets pattern 'nope'"),
    "add_adapters exclude": (compile_mlp(passes="add_adapters(method=lora,rank=2,exclude=[nope])"), PassError,
                             "pass 'add_adapters': exclude pattern 'nope'"),
    "add_adapters targets": (compile_mlp(passes="add_adapters(method=lora,rank=2,targets=[nope])"), PassError,
                             "pass 'add_adapters': targets pattern 'nope' matches no linear layer. Available: fc1, fc2, fc3"),
    "prune exclude": (compile_mlp(passes="prune(method=magnitude,exclude=[nope])"), PassError,
                      "pass 'prune': exclude pattern 'nope' matches no heads/channels group. Available: <model>, fc3"),
    "prune targets": (compile_mlp(passes="prune(method=magnitude,targets=[nope])"), PassError,
                      "pass 'prune': targets pattern 'nope' matches no heads/channels group. Available: <model>, fc3"),
    "group size that does not divide": (compile_mlp(passes="quantize(group_size=128)"), PassError,
                                        "group_size=-1 for one group per channel"),
}


@pytest.mark.parametrize("case", list(TRACE_AND_PASS_CASES))
def test_bad_inputs_or_selection_are_named(case, zoo):
    action, error, fragment = TRACE_AND_PASS_CASES[case]
    raises(zoo, error, fragment, lambda: action(zoo))


def test_targets_error_names_the_pass_for_the_report(zoo):
    error = raises(zoo, PassError, "matches no linear layer",
                   lambda: fxforge.compile(zoo.mlp, (zoo.x,), passes="quantize(targets=['attn.*'])"))
    assert error.pass_name == "quantize"


# --------------------------------------------------------------------------- API: backends


def test_uppercase_backend_is_accepted_case_insensitively(zoo):
    compiled = fxforge.compile(zoo.mlp, (zoo.x,), backend=" Eager ")
    assert compiled.backend == "eager"
    assert_unchanged(zoo)


def test_float_backend_tolerance_means_abs_and_rel(zoo, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda gm, **options: gm)  # inductor, minus the compile time
    compiled = fxforge.compile(zoo.mlp, (zoo.x,), backend="inductor", backend_tolerance=1e-3)
    assert compiled.report.backend_check is not None and compiled.report.backend_check.ok
    assert_unchanged(zoo)


def test_backend_failing_while_preparing_is_named(zoo, monkeypatch):
    def broken(gm, **options):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(torch, "compile", broken)
    error = raises(zoo, BackendError, "backend 'inductor' failed while preparing the model: RuntimeError: "
                   "no C compiler", lambda: fxforge.compile(zoo.mlp, (zoo.x,), backend="inductor"))
    assert isinstance(error.__cause__, RuntimeError)


def test_backend_failing_while_verified_is_named(zoo, monkeypatch):
    def runs_badly(*flat):
        raise IndexError("kernel read out of bounds")

    monkeypatch.setattr(torch, "compile", lambda gm, **options: runs_badly)
    raises(zoo, BackendError, "backend 'inductor' failed while checking it against eager on the example inputs",
           lambda: fxforge.compile(zoo.mlp, (zoo.x,), backend="inductor"))


# --------------------------------------------------------------------------- API: calling


def _llama_call(**changes: Any) -> Callable[[Zoo], Any]:
    def call(z: Zoo) -> Any:
        kwargs = dict(z.llama_kwargs)
        for key, change in changes.items():
            if change is None:
                kwargs.pop(key)
            elif callable(change):
                kwargs[key] = change(kwargs[key])
            else:
                kwargs[key] = change
        return z.compiled_llama(**kwargs)

    return call


CALL_CASES = {
    "wrong feature size": (lambda z: z.compiled_mlp(z.x[:, :7]), "dimension 1 must be 32, as it was static"),
    "expected shape shows symbols": (lambda z: z.compiled_mlp(z.x[:, :7]), "must have shape (s"),
    "wrong rank": (lambda z: z.compiled_mlp(z.x[None]), "input 'x' must have rank 2"),
    "wrong dtype": (lambda z: z.compiled_mlp(z.x.double()), "must be torch.float32, got torch.float64"),
    "numpy instead of tensor": (lambda z: z.compiled_mlp(z.x.numpy()), "must be a tensor of shape"),
    "wrong device": (lambda z: z.compiled_mlp(torch.empty(4, 32, device="meta")), "must be on device 'cpu'"),
    "extra positional input": (lambda z: z.compiled_mlp(z.x, z.x), "takes 1 positional input(s), got 2"),
    "unknown keyword": (lambda z: z.compiled_mlp(z.x, foo=z.x), "unexpected keyword input(s) 'foo'"),
    "no inputs": (lambda z: z.compiled_mlp(), "got 0"),
    "mask shorter than ids": (_llama_call(attention_mask=lambda m: m[:, :-1]),
                              "must equal dimension 1 of 'input_ids'"),
    "mask of another batch": (_llama_call(attention_mask=lambda m: m[:1]), "must equal dimension 0 of 'input_ids'"),
    "token ids out of vocabulary": (_llama_call(input_ids=lambda ids: ids + 1000), "outside the vocabulary"),
    "negative token ids": (_llama_call(input_ids=lambda ids: ids * 0 - 1), "token ids in [-1, -1]"),
    "vocabulary range named": (_llama_call(input_ids=lambda ids: ids + 1000), "[0, 255]"),
    "missing mask": (_llama_call(attention_mask=None), "missing keyword input(s) 'attention_mask'"),
    "missing input shows the expected shapes": (_llama_call(attention_mask=None), "torch.int64, ids < 256"),
    "float token ids": (_llama_call(input_ids=lambda ids: ids.float()), "must be torch.int64, got torch.float32"),
    "ids positionally": (lambda z: z.compiled_llama(z.llama_kwargs["input_ids"], z.llama_kwargs["attention_mask"]),
                         "it takes 0 positional input(s), got 2"),
    "int32 mask": (_llama_call(attention_mask=lambda m: m.int()), "convert it with .to(torch.int64)"),
}


@pytest.mark.parametrize("case", list(CALL_CASES))
def test_bad_call_is_an_input_error_before_the_graph_runs(case, zoo, monkeypatch):
    action, fragment = CALL_CASES[case]

    def never(*flat):
        raise AssertionError("the graph ran on inputs the check should have refused")

    for compiled in (zoo.compiled_mlp, zoo.compiled_llama):
        monkeypatch.setattr(compiled, "_runner", never)
    raises(zoo, InputError, fragment, lambda: action(zoo))


def test_good_calls_still_run_at_other_shapes(zoo):
    assert zoo.compiled_mlp(zoo.x[:1]).shape == (1, 10)
    ids = torch.randint(0, 256, (3, 5))
    assert zoo.compiled_llama(input_ids=ids, attention_mask=torch.ones_like(ids)).shape == (3, 5, 256)


# --------------------------------------------------------------------------- skipped, never silent


def test_sparsify_after_quantizing_everything_to_int8_is_refused_naming_both(zoo):
    with pytest.raises(PassSpecError, match=r"sparsify cannot follow quantize_dynamic.*Run sparsify before"):
        fxforge.compile(zoo.mlp, (zoo.x,), passes="quantize_dynamic,sparsify(method=magnitude)")
    assert_unchanged(zoo)


def test_sparsify_after_quantizing_some_layers_says_why_it_skipped_them(zoo):
    compiled = fxforge.compile(zoo.mlp, (zoo.x,),
                               passes="quantize_dynamic(targets=[fc1]),sparsify(method=magnitude)")
    record = compiled.report["sparsify"]
    assert record.sites == 2
    assert [where for where, _ in record.skipped] == ["fc1"]
    assert "already rewritten by an earlier pass (now fxforge::linear_w8a8)" in record.skipped[0][1]
    assert "run sparsify before that pass" in str(compiled.report)
    assert_unchanged(zoo)


def test_quantizing_twice_reports_the_layers_already_quantized(zoo):
    compiled = fxforge.compile(zoo.mlp, (zoo.x,), passes="quantize(group_size=-1,targets=[fc1]),quantize_dynamic")
    record = compiled.report["quantize_dynamic"]
    assert record.sites == 2
    assert record.skipped == [("fc1", record.skipped[0][1])] and "fxforge::linear_wq" in record.skipped[0][1]


def test_lm_head_named_in_targets_is_skipped_with_the_fix(zoo):
    compiled = fxforge.compile(zoo.llama, (), zoo.llama_kwargs, passes="quantize_dynamic(targets=[lm_head])")
    record = compiled.report["quantize_dynamic"]
    assert record.sites == 0
    assert record.skipped and "include_lm_head=True" in record.skipped[0][1]
    assert_unchanged(zoo)


# --------------------------------------------------------------------------- CLI


FACTORIES = textwrap.dedent('''
    import torch

    NOT_CALLABLE = 3

    def good():
        return torch.nn.Linear(4, 2), (torch.randn(2, 4),)

    def bare_model():
        return torch.nn.Linear(4, 2)

    def raises():
        raise RuntimeError("weights not found")

    def wrong_shape():
        return "model"

    def wrong_width():
        return torch.nn.Linear(4, 2), (torch.randn(2, 7),)
''')


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    root = tmp_path_factory.mktemp("factories")
    (root / "fxforge_bad_factories.py").write_text(FACTORIES)
    sys.path.insert(0, str(root))
    yield "fxforge_bad_factories"
    sys.path.remove(str(root))
    sys.modules.pop("fxforge_bad_factories", None)


CLI_CASES = {
    "output is a file": (["compile", "zoo:mlp", "-o", "{file}"], "is an existing file"),
    "output under a file": (["compile", "zoo:mlp", "-o", "{file}/sub"], "is a file"),
    "factory module missing": (["compile", "no_such_module_xyz:make", "-o", "{out}"],
                               "cannot import module 'no_such_module_xyz'"),
    "factory missing": (["compile", "{mod}:nope", "-o", "{out}"], "has no attribute 'nope'"),
    "factory not callable": (["compile", "{mod}:NOT_CALLABLE", "-o", "{out}"], "is a int, not a function"),
    "factory returns a bare model": (["compile", "{mod}:bare_model", "-o", "{out}"], "without example inputs"),
    "factory raises": (["compile", "{mod}:raises", "-o", "{out}"], "the factory raised RuntimeError"),
    "factory returns garbage": (["compile", "{mod}:wrong_shape", "-o", "{out}"], "must return (model, args)"),
    "MODEL with an empty factory": (["compile", "{mod}:", "-o", "{out}"], "with both parts"),
    "unknown backend": (["compile", "zoo:mlp", "--backend", "onxx", "-o", "{out}"], "Did you mean 'onnx'?"),
    "bad pass spec": (["compile", "zoo:mlp", "--passes", "quantize(bitz=4)", "-o", "{out}"], "no option 'bitz'"),
    "duplicate option": (["compile", "zoo:mlp", "--passes", "quantize(bits=4,bits=8)", "-o", "{out}"],
                         "given twice"),
    "unknown zoo model": (["compile", "zoo:gpt5", "-o", "{out}"], "unknown zoo model 'gpt5'"),
    "uninterpretable MODEL": (["inspect", "not-a-model"], "cannot interpret MODEL"),
    "targets matching nothing": (["compile", "{mod}:good", "--passes", "quantize(targets=[nope])", "-o", "{out}"],
                                 "targets pattern 'nope' matches no linear layer"),
    "trace error is one line": (["compile", "{mod}:wrong_width", "-o", "{out}"], "could not trace Linear"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_error_is_one_line_and_status_2(case, factories, tmp_path, capsys):
    argv, fragment = CLI_CASES[case]
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    out = tmp_path / "out"
    argv = [a.format(file=a_file, out=out, mod=factories) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxforge: error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    assert "Traceback" not in err
    assert a_file.read_text() == "keep me" and not out.exists()


def test_cli_debug_prints_the_traceback(capsys):
    assert main(["compile", "zoo:mlp", "--backend", "onxx", "-o", "unused", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("fxforge: error: unknown backend")


def test_cli_accepts_uppercase_backend(factories, tmp_path, capsys):
    assert main(["compile", f"{factories}:good", "--backend", "EAGER", "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_cli_checks_arguments_before_building_the_model(factories, tmp_path, capsys, monkeypatch):
    built = []
    monkeypatch.setattr("fxforge.cli.resolve_model", lambda *a, **k: built.append(a))
    assert main(["compile", "zoo:mlp", "--passes", "quantise", "-o", str(tmp_path / "o")]) == 2
    assert built == []


# --------------------------------------------------------------------------- parser properties


PASS_NAMES = sorted(registered_passes())
_OPTION_NAMES = sorted({f for cls in registered_passes().values() for f in cls.__dataclass_fields__})
_VALUES = ["4", "-1", "0", "1e999", "nan", "True", "None", "'x'", "[1,2]", "[a,b]", "{}", "{[1]:2}", "()",
           "(1,)", "'2:4'", "2:4", "awq", "0.5", "[]", "[[]]", "b''", "1j", "...", "'", "((", "=", "1,2"]
_ITEM = st.tuples(st.sampled_from(PASS_NAMES + ["nope", ""]),
                  st.lists(st.tuples(st.sampled_from(_OPTION_NAMES), st.sampled_from(_VALUES)), max_size=4)).map(
    lambda t: t[0] + (f"({','.join(f'{k}={v}' for k, v in t[1])})" if t[1] else ""))
_PIPELINES = st.lists(_ITEM, min_size=1, max_size=3).map(",".join)
_NOISE = st.lists(st.sampled_from(list("(),=[]{}'\":. _-09abqxz") + ["quantize", "bits", "\\", "\x00"]),
                  max_size=30).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(_PIPELINES, _NOISE, st.text(max_size=30)))
def test_parser_raises_nothing_but_pass_spec_error(text):
    try:
        passes = parse_pipeline(text)
    except PassSpecError:
        return
    assert all(p.name in PASS_NAMES for p in passes)
