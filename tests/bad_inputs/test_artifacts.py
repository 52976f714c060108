"""Hostile and broken artifacts: every one is an ArtifactError naming the problem, runs no code
and writes no file, whether loaded by fxforge.load, `fxforge inspect DIR` or `fxforge export DIR`.

Each case starts from a good saved artifact and edits it the way an attacker could: after the
edit the graph file's sha256 in the manifest is recomputed (the hash lives in the file the
attacker writes), so the loader's refusal comes from its allowlists and type checks, not from a
checksum. Payloads that would run code try to create a sentinel file; its absence is asserted.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fxforge
from fxforge.cli import main
from fxforge.errors import ArtifactError
from fxforge.models import get_model

Edit = Callable[[dict, dict, Path, str], None]  # (graph, manifest, artifact dir, sentinel path)


@pytest.fixture(scope="module")
def good_artifact(tmp_path_factory) -> Path:
    zoo = get_model("mlp")
    path = tmp_path_factory.mktemp("good") / "artifact"
    fxforge.compile(zoo.model, zoo.args, verify=False).save(path)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def craft(good: Path, root: Path, edit: Edit, sentinel: Path) -> Path:
    """A copy of `good` under `root`, edited by `edit`, with the listed hashes recomputed.

    An edit that writes a file itself marks the parsed document with "__raw__" (leave the file
    as written) or the manifest with "_keep_hashes" (leave the recorded hashes stale)."""
    art = root / "artifact"
    shutil.copytree(good, art)
    graph = json.loads((art / "graph.json").read_text())
    manifest = json.loads((art / "manifest.json").read_text())
    edit(graph, manifest, art, str(sentinel))
    if "__raw__" not in graph:
        (art / "graph.json").write_text(json.dumps(graph))
    if "__raw__" in manifest:
        return art
    files = manifest.get("files")
    if isinstance(files, dict) and not manifest.pop("_keep_hashes", False):
        for name, digest in files.items():
            if (art / name).is_file() and isinstance(digest, str) and len(digest) == 64:
                files[name] = _sha(art / name)
    (art / "manifest.json").write_text(json.dumps(manifest))
    return art


# ---------------------------------------------------------------------------- the edits


def _first(graph: dict, op: str) -> dict:
    return next(n for n in graph["nodes"] if n["op"] == op)


def _call(target: str, *args: Any) -> Edit:
    """The first call node calls `target` with `args` (strings that would create the sentinel)."""
    def edit(graph, manifest, art, sentinel):
        node = _first(graph, "call_function")
        node["target"] = target
        node["args"] = {"tuple": [a.replace("SENTINEL", sentinel) if isinstance(a, str) else a for a in args]}
        node["kwargs"] = {"dict": {}}
    return edit


CODE = "import pathlib; pathlib.Path('SENTINEL').touch()"
EXPR = "__import__('pathlib').Path('SENTINEL').touch()"


def _node_field(op: str, field: str, value: Any) -> Edit:
    def edit(graph, manifest, art, sentinel):
        _first(graph, op)[field] = value.replace("SENTINEL", sentinel) if isinstance(value, str) else value
    return edit


def _rename(op: str, new: str) -> Edit:
    """Rename the first `op` node to `new` everywhere it is used, as a real exploit would."""
    def edit(graph, manifest, art, sentinel):
        node = _first(graph, op)
        old, node["name"] = node["name"], new.replace("SENTINEL", sentinel)
        if op == "placeholder":
            node["target"] = node["name"]
        text = json.dumps(graph).replace(json.dumps({"node": old}), json.dumps({"node": node["name"]}))
        graph.update(json.loads(text))
    return edit


def _graph(fn: Callable[[dict], None]) -> Edit:
    return lambda graph, manifest, art, sentinel: fn(graph)


def _manifest(fn: Callable[[dict], None]) -> Edit:
    return lambda graph, manifest, art, sentinel: fn(manifest)


def _set(key: str, value: Any) -> Edit:
    return _manifest(lambda m: m.__setitem__(key, value))


def _write_raw(name: str, text: str) -> Edit:
    """Write `text` as file `name` (the manifest as is; other files are then re-hashed)."""
    def edit(graph, manifest, art, sentinel):
        (art / name).write_text(text)
        if name == "manifest.json":
            manifest["__raw__"] = True
    return edit


def _truncated_graph(graph, manifest, art, sentinel):
    text = json.dumps(graph)
    graph["__raw__"] = True
    (art / "graph.json").write_text(text[: len(text) // 2])  # re-hashed by craft


def _corrupt_weights(graph, manifest, art, sentinel):
    data = bytearray((art / "weights.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (art / "weights.safetensors").write_bytes(bytes(data))
    manifest["_keep_hashes"] = True


def _symlinked_weights(graph, manifest, art, sentinel):
    real = art.parent / "elsewhere.safetensors"
    shutil.move(art / "weights.safetensors", real)
    (art / "weights.safetensors").symlink_to(real)


def _defaultdict_spec(factory_module: str) -> str:
    # torch's own treespec_loads would import factory_module: a file-named import runs code.
    return json.dumps([1, {"type": "collections.defaultdict", "children_spec": [],
                           "context": {"default_factory_module": factory_module,
                                       "default_factory_name": "system", "dict_context": []}}])


ENUM_SPEC = json.dumps([1, {"type": "builtins.dict", "children_spec": [],
                            "context": json.dumps({"__enum__": True, "fqn": "antigravity:X", "name": "Y"})}])


def _extra_tensor(graph, manifest, art, sentinel):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(art / "weights.safetensors"))
    save_file({**weights, "hidden": torch.zeros(1)}, str(art / "weights.safetensors"))


def _drop_input(graph, manifest, art, sentinel):
    from safetensors.torch import save_file

    save_file({"input_7": torch.zeros(1)}, str(art / "inputs.safetensors"))


def _unknown_tensor_ref(m):
    m["graph_meta"] = {"fxforge_masks": {"__tensor__": "fxforge_masks/nowhere"}}


CASES: list[tuple[str, Edit, str]] = [
    # call targets outside the allowlist
    ("builtins.exec", _call("builtins.exec", CODE), "is not allowed"),
    ("builtins.eval", _call("builtins.eval", EXPR), "is not allowed"),
    ("builtins.open", _call("builtins.open", "SENTINEL", "w"), "is not allowed"),
    ("builtins.getattr", _call("builtins.getattr", "x", "__class__"), "is not allowed"),
    ("builtins.__import__", _call("builtins.__import__", "os"), "is not allowed"),
    ("os.system", _call("os.system", "touch SENTINEL"), "is not allowed"),
    ("subprocess.Popen", _call("subprocess.Popen", {"list": ["touch", "SENTINEL"]}), "is not allowed"),
    ("torch.load", _call("torch.load", "SENTINEL"), "is not allowed"),
    ("torch.hub.load", _call("torch.hub.load", "evil/repo", "model"), "is not allowed"),
    ("operator.attrgetter", _call("operator.attrgetter", "__class__"), "is not allowed"),
    ("aten.save", _call("torch.ops.aten.save.default", {"list": []}, "SENTINEL"), "reads or writes outside"),
    ("aten.from_file", _call("torch.ops.aten.from_file.default", "SENTINEL", True, 4), "reads or writes outside"),
    ("aten.missing_op", _call("torch.ops.aten.definitely_not_an_op.default"), "names no op"),
    ("aten.missing_overload", _call("torch.ops.aten.add.NoSuchOverload"), "has no overload"),
    ("aten.dunder_attribute", _call("torch.ops.aten.__class__.__init__"), "names no op"),
    ("foreign_namespace", _call("torch.ops.mylib.evil.default"), "namespaces"),
    ("target_not_string", _node_field("call_function", "target", ["builtins", "exec"]), "must be a string"),
    # names that FX would paste into generated source
    ("placeholder_name_code", _rename("placeholder", "x=" + EXPR), "not a plain identifier"),
    ("placeholder_target_code", _node_field("placeholder", "target", "x=" + EXPR), "placeholder target"),
    ("node_name_code", _rename("call_function", "y;" + EXPR), "not a plain identifier"),
    ("node_name_keyword", _node_field("call_function", "name", "import"), "reserved"),
    ("node_name_dunder", _node_field("call_function", "name", "__class__"), "reserved"),
    ("node_name_self", _node_field("call_function", "name", "self"), "reserved"),
    ("node_name_builtin", _node_field("call_function", "name", "exec"), "reserved"),
    ("node_name_int", _node_field("call_function", "name", 7), "must be a string"),
    ("get_attr_dunder_path", _node_field("get_attr", "target", "fc1.__class__.__init__.__globals__"), "dunder"),
    ("get_attr_quote", _node_field("get_attr", "target", 'fc1"); ' + EXPR + '; ("'), "not a dotted path"),
    ("get_attr_module_attribute", _node_field("get_attr", "target", "forward"), "reserved name"),
    ("get_attr_unknown_tensor", _node_field("get_attr", "target", "fc1.nothere"), "not a tensor of this artifact"),
    ("kwarg_name_code", _node_field("call_function", "kwargs", {"dict": {"x=" + EXPR: 1}}), "keyword argument name"),
    ("unknown_value_kind", _node_field("call_function", "args", {"tuple": [{"pickle": "gASV"}]}),
     "unknown encoded value kind"),
    ("dtype_not_a_dtype", _node_field("call_function", "args", {"tuple": [{"dtype": "load"}]}), "is not a torch dtype"),
    ("raw_list_argument", _node_field("call_function", "args", [1, 2]), "is not an encoded value"),
    ("node_ref_undefined", _node_field("call_function", "args", {"tuple": [{"node": "later"}]}),
     "not defined before it"),
    ("duplicate_node_name", _graph(lambda g: g["nodes"][1].__setitem__("name", g["nodes"][0]["name"])),
     "names must be unique"),
    ("call_module_node", _node_field("call_function", "op", "call_module"), "unsupported op"),
    ("no_output_node", _graph(lambda g: g["nodes"].pop()), "exactly one output"),
    ("unknown_node_field", _node_field("call_function", "code", EXPR), "unknown fields"),
    ("graph_format", _graph(lambda g: g.__setitem__("format", "fxforge-graph-v0")), "is not an fxforge-graph-v1"),
    ("graph_nodes_wrong_type", _graph(lambda g: g.__setitem__("nodes", {"0": {}})), "must be a non-empty list"),
    ("graph_truncated", _truncated_graph, "graph.json is corrupted"),
    # manifest fields
    ("manifest_truncated", _write_raw("manifest.json", '{"format": 1, "files": {'), "manifest.json is corrupted"),
    ("manifest_list", _write_raw("manifest.json", "[1, 2]"), "must hold an object"),
    ("format_version", _set("format", 2), "'format' is 2"),
    ("format_string", _set("format", "1"), "'format' is '1'"),
    ("files_wrong_type", _set("files", ["graph.json"]), "field 'files' must be a dict"),
    ("files_digest_type", _manifest(lambda m: m["files"].__setitem__("graph.json", 5)), "sha256 hex digest"),
    ("files_path_escape", _manifest(lambda m: m["files"].__setitem__("../../etc/passwd", "0" * 64)),
     "not a file of an fxforge artifact"),
    ("tensors_missing", _manifest(lambda m: m.pop("tensors")), "field 'tensors' is missing"),
    ("tensor_flag_type", _manifest(lambda m: next(iter(m["tensors"].values())).__setitem__("parameter", "yes")),
     "must be true or false"),
    ("tensor_name_dunder", _manifest(lambda m: m["tensors"].__setitem__("__class__.x", m["tensors"].pop(next(iter(m["tensors"]))))),
     "dunder"),
    ("tensor_alias_unknown", _manifest(lambda m: next(iter(m["tensors"].values())).__setitem__("alias_of", "ghost")),
     "alias_of"),
    ("backend_unknown", _set("backend", "evil"), "field 'backend'"),
    ("pipeline_wrong_type", _set("pipeline", 3), "field 'pipeline' must be a str"),
    ("unknown_manifest_field", _set("loader", EXPR), "unknown fields"),
    ("in_spec_defaultdict_import", _set("in_spec", _defaultdict_spec("os")), "cannot be loaded"),
    ("in_spec_enum_import", _set("in_spec", ENUM_SPEC), "not plain JSON"),
    ("out_spec_unregistered_type", _set("out_spec", json.dumps(
        [1, {"type": "evil.Module", "context": "null", "children_spec": []}])), "cannot be loaded"),
    ("out_spec_garbage", _set("out_spec", "{{{"), "not a serialized pytree spec"),
    ("input_names_code", _set("input_names", [EXPR]), "input_names[0]"),
    ("graph_meta_spec_key", _set("graph_meta", {"fxforge_in_spec": "x"}), "not a pass's"),
    ("graph_meta_missing_tensor", _manifest(_unknown_tensor_ref), "refers to a tensor"),
    # the files of the directory
    ("unlisted_file", _write_raw("evil.py", "import os"), "does not list: evil.py"),
    ("unlisted_directory", lambda g, m, art, s: (art / "__pycache__").mkdir(), "does not list: __pycache__"),
    ("missing_file", lambda g, m, art, s: (art / "weights.safetensors").unlink(), "weights.safetensors is missing"),
    ("unlisted_required_file", _manifest(lambda m: m["files"].pop("graph.json")), "does not list graph.json"),
    ("hash_mismatch", _corrupt_weights, "weights.safetensors does not match its checksum"),
    ("symlinked_file", _symlinked_weights, "symbolic link"),
    ("weights_not_safetensors", _write_raw("weights.safetensors", "not a tensor file"),
     "could not be read"),
    ("weights_extra_tensor", _extra_tensor, "disagree"),
    ("inputs_misnamed", _drop_input, "must hold input_0"),
]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(root.rglob("*"))}


def _via_load(art: Path, out: Path, capsys) -> str:
    with pytest.raises(ArtifactError) as info:
        fxforge.load(art, backend="eager")
    return str(info.value)


def _via_cli(argv: Callable[[Path, Path], list[str]]) -> Callable[[Path, Path, Any], str]:
    def run(art: Path, out: Path, capsys) -> str:
        capsys.readouterr()
        assert main(argv(art, out)) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err
    return run


ENTRY_POINTS = {
    "load": _via_load,
    "inspect": _via_cli(lambda art, out: ["inspect", str(art)]),
    "export": _via_cli(lambda art, out: ["export", str(art), "-o", str(out)]),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case, edit, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_artifact_is_refused(good_artifact, tmp_path, capsys, entry, case, edit, fragment):
    sentinel = tmp_path / "PWNED"
    art = craft(good_artifact, tmp_path, edit, sentinel)
    out = tmp_path / "exported.onnx"
    before = _snapshot(tmp_path)
    message = ENTRY_POINTS[entry](art, out, capsys)
    assert fragment in message
    assert not sentinel.exists(), "loading the artifact ran code from it"
    assert _snapshot(tmp_path) == before, "loading a refused artifact changed files"
    assert not out.exists()


def test_the_unedited_copy_loads_everywhere(good_artifact, tmp_path, capsys):
    # The harness itself is sound: a copy edited by a no-op passes all three entry points.
    art = craft(good_artifact, tmp_path, lambda g, m, a, s: None, tmp_path / "PWNED")
    zoo = get_model("mlp")
    assert torch.equal(fxforge.load(art)(*zoo.args), fxforge.load(good_artifact)(*zoo.args))
    assert main(["inspect", str(art)]) == 0
    assert "linear sites: 3" in capsys.readouterr().out
    assert main(["export", str(art), "-o", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 1000


def test_saving_refuses_what_loading_would_refuse(tmp_path):
    # A graph calling a function outside the allowlist cannot be saved either, and the refusal
    # comes before the first byte is written.
    zoo = get_model("mlp")
    compiled = fxforge.compile(zoo.model, zoo.args, verify=False)
    node = next(n for n in compiled.graph_module.graph.nodes if n.op == "call_function")
    node.target = print
    with pytest.raises(ArtifactError, match="cannot save call target"):
        compiled.save(tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------- property: mutations

PAYLOADS = [
    "x=" + EXPR, EXPR, CODE, "builtins.exec", "builtins.eval", "builtins.open", "os.system",
    "subprocess.Popen", "torch.load", "torch.hub.load", "__import__", "__class__", "self", "import",
    "torch.ops.aten.save.default", "torch.ops.mylib.evil.default", "operator.getitem",
    "torch.ops.aten.add.Tensor", "fc1.weight", "fc1.__class__", "x", "", "collections.defaultdict",
    _defaultdict_spec("os"), ENUM_SPEC, "1", "nan", "float32", "../graph.json",
]
DANGEROUS = ["builtins.exec", "builtins.eval", "builtins.compile", "os.system", "subprocess.run",
             "torch.load", "runpy.run_path", "code.InteractiveInterpreter.runsource",
             "torch.ops.aten.save.default"]
OTHER_VALUES = [None, 0, -1, 2**70, 1.5, True, [], {}, [EXPR], {"node": "x"}, {"__tensor__": "x"}]


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location inside a JSON value, as a tuple of keys/indexes."""
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*prefix, i))
    return found


def _mutate(doc: Any, path: tuple, action: str, new: Any) -> Any:
    if not path:
        return new if action != "delete" else None
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete":
        del parent[path[-1]]
    elif action == "rename" and isinstance(parent, dict) and isinstance(new, str):
        parent[new] = parent.pop(path[-1])
    else:
        parent[path[-1]] = new
    return doc


@pytest.fixture(scope="module")
def sentinel_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sentinel")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_artifacts_never_run_code(good_artifact, sentinel_dir, tmp_path_factory, data):
    sentinel = sentinel_dir / "PWNED"
    payloads = [p.replace("SENTINEL", str(sentinel)) for p in PAYLOADS]
    art = tmp_path_factory.mktemp("mutant") / "artifact"
    shutil.copytree(good_artifact, art)
    name = data.draw(st.sampled_from(["graph.json", "graph.json", "manifest.json"]), label="file")
    doc = json.loads((art / name).read_text())
    if name == "graph.json" and data.draw(st.booleans(), label="inject a call"):
        # a call node pointed at a code-running function with code that creates the sentinel
        calls = [n for n in doc["nodes"] if n["op"] == "call_function"]
        node = data.draw(st.sampled_from(calls), label="node")
        node["target"] = data.draw(st.sampled_from(DANGEROUS), label="target")
        node["args"] = {"tuple": [data.draw(st.sampled_from(payloads[:3]), label="code")]}
    for _ in range(data.draw(st.integers(0 if name == "graph.json" else 1, 3), label="mutations")):
        paths = _paths(doc)
        path = data.draw(st.sampled_from(paths), label="path")
        action = data.draw(st.sampled_from(["replace", "replace", "retype", "delete", "rename"]), label="action")
        new = data.draw(st.sampled_from(payloads if action in ("replace", "rename") else OTHER_VALUES), label="value")
        if action == "delete" and not path:
            continue
        doc = _mutate(doc, path, action, new)
    (art / name).write_text(json.dumps(doc))
    if name == "graph.json" and data.draw(st.sampled_from([True, True, True, False]), label="rehash"):
        manifest = json.loads((art / "manifest.json").read_text())
        manifest["files"]["graph.json"] = _sha(art / "graph.json")
        (art / "manifest.json").write_text(json.dumps(manifest))
    try:
        fxforge.load(art, backend="eager")
        event("loaded")
    except ArtifactError as exc:
        event(f"refused: {str(exc).split(':')[0][:40]}")
    assert not sentinel.exists(), "a mutated artifact ran code"
