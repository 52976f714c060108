"""In-graph greedy verification: the graph's accepted node and next token are greedy_accept's."""
import pytest
import torch

import fxforge.medusa as medusa
from fxforge.api import CompiledModel
from fxforge.errors import InputError
from fxforge.passes.add_medusa_heads import AddMedusaHeads
from fxforge.runtime.meta_keys import MEDUSA_META
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass
from fxforge.passes.kv_cache.add_kv_cache import with_kv_cache
from fxforge.runtime.decoding import CachedLM, greedy_generate
from fxforge.runtime.greedy_verify import add_greedy_verification
from fxforge.runtime.medusa_tree import MedusaTree, greedy_accept
from runtime.fused_code_lm import example_ids, fused_graph

TREE = MedusaTree.from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])


@pytest.fixture(scope="module")
def compiled():
    """Tiny code-lm + 3 Medusa heads with random ResBlocks (they need not be good, only fixed)."""
    gm, ids = fused_graph()
    with_heads = run_pass(AddMedusaHeads(num_heads=3), gm, PassContext(example_inputs=(ids,)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in with_heads.named_parameters():
            if name.startswith("medusa_heads.") and ".linear." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return CompiledModel(with_heads, "eager", example_inputs=(ids,))


@pytest.fixture(scope="module")
def lms(compiled):
    main, heads = medusa.split_heads_for_decoding(with_kv_cache(compiled.graph_module))
    return CachedLM(main, main, heads_runner=heads), CachedLM.prepare(add_greedy_verification(main, heads))


def test_graph_takes_tree_parents_and_returns_accepted_node_next_token_and_its_heads(lms):
    split, verifying = lms
    gm = verifying.graph_module
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert names[-1] == "tree_parents" and verifying.layout.tree_parents == len(names) - 1
    layout = gm.meta[MEDUSA_META]
    outputs = gm.graph.output_node().args[0]
    assert (layout.best_output, layout.next_token_output) == (len(outputs) - 2, len(outputs) - 1)
    assert layout.verifies_in_graph and not layout.heads_apart
    assert not split.verifies_in_graph and verifying.verifies_in_graph
    # the heads run once, on the accepted node's hidden state: their ResBlocks appear once per head
    silus = [n for n in gm.graph.nodes if n.target == torch.ops.aten.silu.default and "medusa" in
             str(n.meta.get("module_path", ""))]
    assert len(silus) == 3


@pytest.mark.parametrize("seed", range(6))
def test_accepted_node_equals_greedy_accept_on_the_same_logits(lms, seed):
    split, verifying = lms
    prompt = example_ids(batch=1, seq=10)
    prefill = split.forward(prompt, split.empty_past(1), 0)
    positions, mask = TREE.inputs(prompt.shape[1])
    # tree tokens: the model's own predictions along some branches (accepted), noise elsewhere
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, prefill.logits.shape[-1], (TREE.num_nodes,), generator=generator)
    tokens[0] = int(prefill.logits[0, -1].argmax())
    for _ in range(2):  # make some children match their parent's prediction
        out = split.forward(tokens[None], prefill.present, prompt.shape[1], positions, mask)
        predicted = out.logits[0].argmax(-1)
        for i in range(1, TREE.num_nodes):
            if torch.rand((), generator=generator) < 0.7:
                tokens[i] = predicted[TREE.parents[i]]
    ref_out = split.forward(tokens[None], prefill.present, prompt.shape[1], positions, mask)
    expected = greedy_accept(TREE, tokens, ref_out.logits[0])
    got = verifying.forward(tokens[None], prefill.present, prompt.shape[1], positions, mask, TREE.parent_index())
    assert TREE.path_to(got.accepted_node) == expected.path and got.next_token == expected.next_token
    heads = split.heads_at(ref_out, expected.path[-1])
    torch.testing.assert_close(got.head_logits[:, 0, 0], heads, rtol=1e-5, atol=1e-5)
    for a, b in zip(got.present, ref_out.present):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_without_parents_the_whole_prompt_is_accepted(lms):
    split, verifying = lms
    prompt = example_ids(batch=1, seq=9)
    got = verifying.forward(prompt, verifying.empty_past(1), 0)
    ref = split.forward(prompt, split.empty_past(1), 0)
    assert got.accepted_node == prompt.shape[1] - 1 and got.next_token == int(ref.logits[0, -1].argmax())
    torch.testing.assert_close(got.head_logits[:, 0, 0], split.heads_at(ref, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", pytest.param("onnx", marks=pytest.mark.slow)])
def test_decoding_verified_in_graph_equals_split_decoding_step_for_step(compiled, backend):
    split = medusa.decoder(compiled, backend)
    verifying = medusa.decoder(compiled, backend, greedy_in_graph=True)
    assert verifying.verifies_in_graph and not split.verifies_in_graph
    for prompt in example_ids(batch=4, seq=10):
        plain = greedy_generate(split, prompt, 12)
        a = medusa.generate(compiled, prompt, 12, tree=TREE, lm=split)
        b = medusa.generate(compiled, prompt, 12, tree=TREE, lm=verifying)
        assert a.tokens == b.tokens == plain.tokens
        assert a.accepted_per_step == b.accepted_per_step


def test_typical_mode_refuses_a_greedy_verifying_decoder(compiled):
    verifying = medusa.decoder(compiled, greedy_in_graph=True)
    with pytest.raises(InputError, match="accepts greedily inside its graph.*greedy_in_graph=False"):
        medusa.generate(compiled, example_ids(batch=1, seq=6)[0], 4, mode="typical", temperature=0.7, lm=verifying)


@pytest.mark.slow
def test_export_onnx_of_the_verifying_graph_runs_in_onnx_runtime(compiled, lms, tmp_path):
    from fxforge.backends.onnx.backend import OnnxRunner

    _, verifying = lms
    path = medusa.export_onnx(compiled, tmp_path / "verify.onnx", greedy_in_graph=True)
    runner = OnnxRunner(path)
    assert runner.input_names[-1] == "tree_parents" and runner.input_names[0] == "input_ids"
    onnx_lm = CachedLM(verifying.graph_module, runner, "onnx")
    prompt = example_ids(batch=1, seq=10)
    prefill = verifying.forward(prompt, verifying.empty_past(1), 0)
    tokens = torch.tensor([[prefill.next_token] + [int(t) for t in prompt[0, :TREE.num_nodes - 1]]])
    positions, mask = TREE.inputs(prompt.shape[1])
    got = onnx_lm.forward(tokens, prefill.present, prompt.shape[1], positions, mask, TREE.parent_index())
    ref = verifying.forward(tokens, prefill.present, prompt.shape[1], positions, mask, TREE.parent_index())
    assert (got.accepted_node, got.next_token) == (ref.accepted_node, ref.next_token)
    torch.testing.assert_close(got.head_logits, ref.head_logits, atol=1e-4, rtol=1e-4)
