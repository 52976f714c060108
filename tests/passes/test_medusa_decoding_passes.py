"""Passes `split_medusa_heads` and `medusa_greedy_verify`, and the typed `MedusaLayout` they keep:
structure, numerics and match counts, refusals, the record's JSON form and its trip through an
artifact."""
import json

import pytest
import torch

import fxforge
import fxforge.medusa as medusa
from fxforge.api import CompiledModel
from fxforge.errors import ArtifactError, PassError
from fxforge.ir.graph import get_attr
from fxforge.passes.add_medusa_heads import AddMedusaHeads
from fxforge.passes.context import PassContext
from fxforge.passes.kv_cache.add_kv_cache import AddKvCache
from fxforge.passes.pipeline import Pipeline, PipelineReport, run_pass
from fxforge.passes.medusa_greedy_verify import MedusaGreedyVerify
from fxforge.passes.split_medusa_heads import SplitMedusaHeads
from fxforge.runtime.decoding import CachedLM, example_cached_inputs
from fxforge.runtime.greedy_verify import add_greedy_verification
from fxforge.runtime.layouts import MedusaLayout
from fxforge.runtime.medusa_split import heads_graph
from fxforge.runtime.medusa_tree import MedusaTree, greedy_accept
from fxforge.runtime.meta_keys import KV_META, MEDUSA_META
from runtime.fused_code_lm import example_ids, fused_graph

aten = torch.ops.aten
HEADS = 3
TREE = MedusaTree.from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0)])


@pytest.fixture(scope="module")
def cached():
    """The fused tiny code-lm with 3 Medusa heads (random ResBlocks) and a KV cache, its context."""
    gm, ids = fused_graph()
    ctx = PassContext(example_inputs=(ids,))
    with_heads = run_pass(AddMedusaHeads(num_heads=HEADS), gm, ctx)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in with_heads.named_parameters():
            if name.startswith("medusa_heads.") and ".linear." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    gm = run_pass(AddKvCache(), with_heads, ctx)
    return gm, PassContext(example_inputs=tuple(example_cached_inputs(gm, batch=1)))


def _run(p, gm, ctx):
    report = PipelineReport()
    out = run_pass(p, gm, PassContext(example_inputs=ctx.example_inputs), report=report)
    return out, report.records[0]


def _medusa_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and str(n.meta.get("module_path", "")).startswith("medusa_heads")]


def test_split_returns_the_hidden_state_and_drops_the_heads(cached):
    gm, ctx = cached
    split, record = _run(SplitMedusaHeads(), gm, ctx)
    layout = split.meta[MEDUSA_META]
    assert record.sites == HEADS and record.verified_shapes  # one site per head, verified
    assert layout.heads_apart and layout.hidden_output == layout.heads_output and not layout.verifies_in_graph
    outputs = split.graph.output_node().args[0]
    assert outputs[layout.hidden_output].name == layout.hidden_node
    assert _medusa_nodes(split) == [] and not any(n.startswith("medusa_heads") for n, _ in split.named_parameters())
    assert len(_medusa_nodes(gm)) > 0 and gm.meta[MEDUSA_META].heads_output == layout.heads_output  # input kept
    # numerics at inputs the pass did not verify on: heads(hidden) are the logits the graph had
    flat = example_cached_inputs(gm, batch=2, past_len=5, new_len=3)
    before, after = gm(*flat), split(*flat)
    heads = heads_graph(gm)(after[layout.hidden_output])[0]
    torch.testing.assert_close(heads, before[layout.heads_output], rtol=1e-5, atol=1e-5)
    for i in range(len(before)):
        if i != layout.heads_output:
            torch.testing.assert_close(after[i], before[i], rtol=0, atol=0)


def test_greedy_verification_pass_equals_greedy_accept_on_a_tree(cached):
    gm, ctx = cached
    verifying, record = _run(MedusaGreedyVerify(), gm, ctx)
    layout, cache = verifying.meta[MEDUSA_META], verifying.meta[KV_META]
    assert record.sites == HEADS and record.verified_shapes
    names = [n.name for n in verifying.graph.nodes if n.op == "placeholder"]
    assert names[-1] == "tree_parents" and cache.tree_parents == len(names) - 1
    outputs = verifying.graph.output_node().args[0]
    assert layout.verifies_in_graph and (layout.best_output, layout.next_token_output) == \
        (len(outputs) - 2, len(outputs) - 1)
    silus = [n for n in _medusa_nodes(verifying) if n.target == aten.silu.default]
    assert len(silus) == HEADS  # the heads run once, at the accepted node
    # a real tree: the pass's graph accepts what greedy_accept accepts on the same logits
    prompt = example_ids(batch=1, seq=10)
    split = medusa.split_heads_for_decoding(gm)
    lm = CachedLM(split[0], split[0], heads_runner=split[1])
    prefill = lm.forward(prompt, lm.empty_past(1), 0)
    tokens = torch.tensor([int(prefill.logits[0, -1].argmax())] + prompt[0, :TREE.num_nodes - 1].tolist())
    positions, mask = TREE.inputs(prompt.shape[1])
    ref = lm.forward(tokens[None], prefill.present, prompt.shape[1], positions, mask)
    expected = greedy_accept(TREE, tokens, ref.logits[0])
    got = CachedLM(verifying, verifying).forward(tokens[None], prefill.present, prompt.shape[1], positions,
                                                       mask, TREE.parent_index())
    assert TREE.path_to(got.accepted_node) == expected.path and got.next_token == expected.next_token
    torch.testing.assert_close(got.head_logits[:, 0, 0], lm.heads_at(ref, expected.path[-1]), rtol=1e-5, atol=1e-5)
    # and it is the graph the runtime function builds
    by_function = add_greedy_verification(*split)
    again = CachedLM(by_function, by_function).forward(tokens[None], prefill.present, prompt.shape[1],
                                                             positions, mask, TREE.parent_index())
    assert (again.accepted_node, again.next_token) == (got.accepted_node, got.next_token)


def test_the_passes_run_by_name_in_a_pipeline(cached):
    gm, ctx = cached
    out, report = Pipeline("medusa_greedy_verify").run(gm, PassContext(example_inputs=ctx.example_inputs))
    assert report["medusa_greedy_verify"].sites == HEADS and out.meta[MEDUSA_META].verifies_in_graph


def test_refusals_name_the_problem(cached):
    gm, ctx = cached
    split, _ = _run(SplitMedusaHeads(), gm, ctx)
    for p in (SplitMedusaHeads(), MedusaGreedyVerify()):
        with pytest.raises(PassError, match="already split off or verify in-graph"):
            _run(p, split, ctx)
    plain, ids = fused_graph()
    with pytest.raises(PassError, match="no Medusa heads; run add_medusa_heads first"):
        run_pass(SplitMedusaHeads(), plain, PassContext(example_inputs=(ids,)))
    with_heads = run_pass(AddMedusaHeads(num_heads=2), plain, PassContext(example_inputs=(ids,)), verify=False)
    with pytest.raises(PassError, match="needs a graph with a KV cache and a tree mask"):
        run_pass(MedusaGreedyVerify(), with_heads, PassContext(example_inputs=(ids,)))


def test_decoder_reports_the_passes_that_built_it(cached):
    gm, _ = cached
    compiled = CompiledModel(gm, "eager", example_inputs=tuple(example_cached_inputs(gm, batch=1)))
    assert [r.name for r in medusa.decoder(compiled).report.records] == ["split_medusa_heads"]
    verifying = medusa.decoder(compiled, greedy_in_graph=True)
    assert [r.name for r in verifying.report.records] == ["medusa_greedy_verify"]
    assert not hasattr(compiled, "_fxforge_medusa_decoders")  # no private state on the model
    assert medusa.decoder(compiled, greedy_in_graph=True) is verifying  # built once


def test_head_accuracy_reads_the_heads_of_a_cached_graph(cached):
    gm, _ = cached  # both layouts in one graph's meta: the KV one places inputs, the Medusa one outputs
    top1, top5, _, positions = medusa.head_accuracy(gm, example_ids(batch=2, seq=12))
    assert len(top1) == len(top5) == HEADS and positions > 0


def _layout(**changes):
    fields = dict(num_heads=3, num_layers=1, share_lm_head=False, logits_output=0, heads_output=1,
                  hidden_size=32, vocab_size=100, lm_head="lm_head.weight", prefix="medusa_heads",
                  hidden_node="norm")
    return MedusaLayout(**{**fields, **changes})


def test_layout_round_trips_through_json_and_rejects_bad_fields():
    for layout in (_layout(), _layout(hidden_output=1), _layout(best_output=5, next_token_output=6)):
        assert MedusaLayout.from_json(json.loads(json.dumps(layout.to_json()))) == layout
    data = _layout().to_json()
    for field, value, message in [("num_heads", "3", "num_heads must be int"), ("share_lm_head", 1, "share_lm_head"),
                                  ("num_heads", 0, "num_heads >= 1"), ("heads_output", 0, "distinct"),
                                  ("hidden_output", 2, "same index"), ("best_output", 4, "set together")]:
        with pytest.raises(ValueError, match=message):
            MedusaLayout.from_json({**data, field: value})
    with pytest.raises(ValueError, match="fields"):
        MedusaLayout.from_json({**data, "accept": {}})


def test_an_artifact_keeps_the_typed_layout_and_checks_it(cached, tmp_path):
    gm, _ = cached
    compiled = CompiledModel(gm, "eager", example_inputs=tuple(example_cached_inputs(gm, batch=1)))
    compiled.save(tmp_path / "a")
    loaded = fxforge.load(tmp_path / "a")
    assert loaded.graph_module.meta[MEDUSA_META] == gm.meta[MEDUSA_META]
    assert isinstance(loaded.graph_module.meta[MEDUSA_META], MedusaLayout)
    assert get_attr(loaded.graph_module, "medusa_heads.0.0.linear.weight").abs().sum() > 0
    manifest_path = tmp_path / "a" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["graph_meta"][MEDUSA_META]["num_heads"] = "3"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="num_heads must be int"):
        fxforge.load(tmp_path / "a")
