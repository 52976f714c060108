"""One method shape and one layer selection for the prune, sparsify and add_adapters families.

* every method is a registered `Method` class of its family (`methods_of` lists them all);
* an option that belongs to another method is refused with a PassSpecError naming the method(s)
  it belongs to, from a pipeline string and from Python alike; the owner accepts it;
* `LayerSelection` normalizes targets/exclude one way, and every selecting pass reports an
  unmatched pattern with the same error.
(The tests that build and run each method live in the families' own files: test_prune*.py,
test_sparsify.py, adapters/test_methods.py.)
"""
import copy

import pytest
from testing_utils import traced_zoo

from fxforge.errors import PassError, PassSpecError
from fxforge.passes.adapters.add_adapters import AddAdapters
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass
from fxforge.passes.methods import Method, methods_of
from fxforge.passes.prune.prune import Prune
from fxforge.passes.prune.sparsify import Sparsify
from fxforge.passes.selection import LayerSelection
from fxforge.passes.spec import parse_pass

PASSES = {"prune": Prune, "sparsify": Sparsify, "add_adapters": AddAdapters}

EXPECTED_METHODS = {
    "prune": {"flap", "magnitude", "wanda_sp"},
    "sparsify": {"magnitude", "wanda", "dsnot"},
    "add_adapters": {"lora", "rslora", "dora", "pissa", "olora", "eva", "lora_ga", "lora_sb", "bone",
                     "svfit", "sorsa", "loldu"},
}

# (family, option) -> the methods it belongs to, and a value different from its default
OWNERS = {
    ("prune", "bias_compensation"): (("flap",), False),
    ("prune", "calibration_batches"): (("flap", "wanda_sp"), 3),
    ("sparsify", "calibration_batches"): (("wanda", "dsnot"), 3),
    ("sparsify", "dsnot_cycles"): (("dsnot",), 7),
    ("add_adapters", "eva_rho"): (("eva",), 3.0),
    ("add_adapters", "eva_tau"): (("eva",), 0.5),
    ("add_adapters", "calibration_limit"): (("eva",), 3),
    ("add_adapters", "ga_batches"): (("lora_ga", "lora_sb"), 2),
    ("add_adapters", "ga_gamma"): (("lora_ga",), 4.0),
    ("add_adapters", "bone_form"): (("bone",), "bat"),
}


def _foreign_cases():
    for (family, option), (owners, value) in OWNERS.items():
        for method in sorted(EXPECTED_METHODS[family] - set(owners)):
            yield pytest.param(family, method, option, owners, value, id=f"{family}-{method}-{option}")


@pytest.mark.parametrize("family", sorted(PASSES))
def test_methods_of_lists_every_method_as_a_method_class(family):
    methods = methods_of(family)
    assert set(methods) == EXPECTED_METHODS[family]
    for name, cls in methods.items():
        assert issubclass(cls, Method) and cls.name == name
        cls()  # every option has a default, so the method builds from the pass's defaults alone


@pytest.mark.parametrize("family", sorted(PASSES))
def test_every_method_option_is_a_pass_option_with_a_known_owner(family):
    """The pass keeps the user-facing names; OWNERS (the table the refusal test reads) is complete."""
    declared: dict[str, set[str]] = {}
    for name, cls in methods_of(family).items():
        for option in cls.option_names():
            declared.setdefault(option, set()).add(name)
    assert set(declared) <= set(PASSES[family].__dataclass_fields__)
    assert {o: set(owners) for (f, o), (owners, _) in OWNERS.items() if f == family} == declared


@pytest.mark.parametrize("family, method, option, owners, value", list(_foreign_cases()))
def test_option_of_another_method_is_refused(family, method, option, owners, value):
    belongs = (f"method '{owners[0]}'" if len(owners) == 1
               else "methods " + ", ".join(f"'{o}'" for o in owners))
    expected = f"option {option}=.* belongs to {belongs}, not '{method}'. Remove it, or use method={owners[0]}"
    with pytest.raises(PassSpecError, match=expected):
        parse_pass(f"{family}(method={method},{option}={value!r})")
    with pytest.raises(PassSpecError, match=expected):  # Python construction says the same
        PASSES[family](method=method, **{option: value})


@pytest.mark.parametrize("family, option", list(OWNERS))
def test_the_owner_receives_its_option(family, option):
    owners, value = OWNERS[(family, option)]
    for owner in owners:
        chosen = parse_pass(f"{family}(method={owner},{option}={value!r})").method_object()
        assert type(chosen) is methods_of(family)[owner]
        assert getattr(chosen, option) == value != getattr(type(chosen)(), option)  # the user's, not the default


@pytest.mark.parametrize("spec, message", [
    ("prune(method=flap,calibration_batches=0)", "calibration_batches must be a positive integer"),
    ("sparsify(method=dsnot,dsnot_cycles=-1)", "dsnot_cycles must be >= 0"),
    ("add_adapters(method=eva,eva_tau=1.5)", r"eva_tau must be in \(0, 1\]"),
    ("add_adapters(method=lora_ga,ga_gamma=0.0)", "ga_gamma must be > 0"),
])
def test_a_method_validates_its_own_options(spec, message):
    with pytest.raises(PassSpecError, match=message):
        parse_pass(spec)


# --------------------------------------------------------------------------- LayerSelection


@pytest.mark.parametrize("targets, exclude, normal", [
    ("q_proj", None, (("q_proj",), ())),
    (["q_proj", "v_proj"], "fc*", (("q_proj", "v_proj"), ("fc*",))),
    (None, ("fc1",), (None, ("fc1",))),
])
def test_layer_selection_has_one_normal_form(targets, exclude, normal):
    selection = LayerSelection(targets, exclude)
    assert (selection.targets, selection.exclude) == normal
    for cls in PASSES.values():  # the passes store the same normal form
        built = cls(targets=targets, exclude=exclude)
        assert (built.targets, built.exclude) == normal
        assert LayerSelection.of(built) == LayerSelection(*normal, getattr(built, "include_lm_head", False))


@pytest.mark.parametrize("bad", [5, ["fc1", 3]])
def test_layer_selection_refuses_what_is_not_a_pattern(bad):
    with pytest.raises(ValueError, match="targets must be a module-path pattern or a list of them"):
        LayerSelection(targets=bad)
    with pytest.raises(PassSpecError, match="exclude must be a module-path pattern"):
        Sparsify(method="magnitude", exclude=bad)


@pytest.fixture(scope="module")
def mlp():
    zoo, gm = traced_zoo("mlp")
    return zoo, gm


@pytest.mark.parametrize("spec, what", [
    ("quantize(targets=[nope])", "linear layer"),
    ("sparsify(method=magnitude,targets=[nope])", "linear layer"),
    ("add_adapters(targets=[nope])", "linear layer"),
    ("shift_add(targets=[nope])", "linear layer"),
    ("prune(method=magnitude,structures=[channels],targets=[nope])", "channels group"),
    ("sparsify(method=magnitude,exclude=[fc9])", "linear layer"),
    ("add_adapters(exclude=[fc9])", "linear layer"),
])
def test_an_unmatched_pattern_is_the_same_error_in_every_pass(mlp, spec, what):
    zoo, gm = mlp
    pass_ = parse_pass(spec)
    option, pattern = ("exclude", "fc9") if "exclude" in spec else ("targets", "nope")
    with pytest.raises(PassError, match=f"pass '{pass_.name}': {option} pattern '{pattern}' matches no {what}"):
        run_pass(pass_, copy.deepcopy(gm), PassContext(example_inputs=tuple(zoo.args)))


@pytest.mark.parametrize("spec", ["quantize(targets=[])", "sparsify(method=magnitude,targets=[])",
                                  "add_adapters(targets=[])", "prune(method=magnitude,targets=[])"])
def test_empty_targets_asks_for_the_intent_in_every_pass(mlp, spec):
    zoo, gm = mlp
    with pytest.raises(PassError, match="targets is empty, which selects no layer"):
        run_pass(parse_pass(spec), copy.deepcopy(gm), PassContext(example_inputs=tuple(zoo.args)))


def test_only_plain_low_rank_adapters_go_beside_a_quantized_base():
    from fxforge.passes.adapters.common import quantized_capable_methods

    # DoRA subclasses LoRA but reads the float weight's norm: the flag must not be inherited
    assert quantized_capable_methods() == ["eva", "lora", "lora_sb", "rslora"]
