"""fxforge.medusa: head training, exact greedy Medusa decoding on eager and ONNX, typical acceptance."""
import pytest
import torch

import fxforge
import fxforge.medusa as medusa
from fxforge.api import CompiledModel
from fxforge.errors import InputError
from fxforge.ir.graph import get_attr
from fxforge.passes.add_medusa_heads import AddMedusaHeads
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass
from fxforge.runtime.decoding import greedy_generate
from runtime.fused_code_lm import fused_graph, tiny_code_lm

NUM_HEADS = 3
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def fused():
    """The tiny code-lm with fused attention as an eager CompiledModel (traced once per session)."""
    gm, ids = fused_graph()
    return CompiledModel(gm, "eager", example_inputs=(ids,))


def with_heads(fused, num_heads):
    """A CompiledModel of `fused` plus fresh Medusa heads."""
    ctx = PassContext(example_inputs=fused.example_inputs)
    gm = run_pass(AddMedusaHeads(num_heads=num_heads), fused.graph_module, ctx)
    return CompiledModel(gm, "eager", example_inputs=fused.example_inputs)


@pytest.fixture(scope="module")
def trained(fused):
    """The tiny code-lm with 3 Medusa heads trained briefly by self-distillation."""
    compiled = with_heads(fused, NUM_HEADS)
    backbone = {n: p.clone() for n, p in compiled.graph_module.named_parameters() if not n.startswith("medusa")}
    report = medusa.train_heads(compiled, None, steps=60, seq_len=32, batch_size=8,
                                self_distill_sequences=32, progress=False)
    return compiled, report, backbone


@pytest.fixture(scope="module")
def prompts():
    """20 held-out prompts of 12 tokens."""
    return tiny_code_lm().heldout_batches(seq_len=12, max_batches=1, batch_size=20)[0]


def test_self_distillation_trains_heads_only(trained):
    compiled, report, backbone = trained
    assert report.source == "self-distillation" and report.steps == 60
    assert len(report.top1) == len(report.top5) == NUM_HEADS
    assert all(0.0 <= a1 <= a5 <= 1.0 for a1, a5 in zip(report.top1, report.top5))
    assert sum(report.losses[-10:]) < sum(report.losses[:10])
    for name, before in backbone.items():  # Medusa-1: the backbone is frozen
        assert torch.equal(get_attr(compiled.graph_module, name), before), name
    assert get_attr(compiled.graph_module, "medusa_heads.0.0.linear.weight").abs().sum() > 0
    assert "top-1" in str(report)


def test_training_on_texts_improves_held_out_accuracy(fused):
    lm = tiny_code_lm()
    compiled = with_heads(fused, 2)
    heldout = lm.heldout_batches(seq_len=32, max_batches=1, batch_size=8)[0]
    before = medusa.head_accuracy(compiled.graph_module, heldout)
    texts = lm.train_texts()[:12]
    report = medusa.train_heads(compiled, texts, tokenizer=lm.tokenizer, heldout=[heldout], steps=40,
                                seq_len=32, lr=3e-3, progress=False)
    assert report.source == "data" and report.heldout_positions > 0
    # fresh heads are copies of the LM head (they predict t+1, not t+2): training must beat that
    assert sum(report.top5) > sum(before[1])
    assert report.top1 == pytest.approx(medusa.head_accuracy(compiled.graph_module, heldout)[0])


def test_self_distillation_from_data_prompts_continues_them_greedily(fused, monkeypatch):
    lm = tiny_code_lm()
    compiled = with_heads(fused, 2)
    seen = {}
    original = medusa.self_distill_rows

    def spy(*args, **kwargs):
        seen["rows"] = original(*args, **kwargs)
        seen["prompts"] = kwargs["prompts"]
        return seen["rows"]

    monkeypatch.setattr(medusa, "self_distill_rows", spy)
    report = medusa.train_heads(compiled, lm.train_texts()[:4], tokenizer=lm.tokenizer, self_distill=True,
                                self_distill_sequences=12, prompt_len=8, seq_len=20, steps=5, progress=False)
    assert report.source == "self-distillation from data prompts"
    rows, prompts = seen["rows"], seen["prompts"]
    assert rows.shape == (12, 20) and torch.equal(rows[:, :8], prompts)  # real prompts, kept
    # the rest is the model's own greedy continuation
    logits = compiled.graph_module(rows)[0]
    assert torch.equal(logits[:, 7:-1].argmax(-1), rows[:, 8:])
    # accuracies count continuation targets only: (20 - 8) per row for head 1 on 1 held-out row
    assert report.heldout_positions == 1 * (20 - 8)


def test_loss_ignores_targets_before_target_start():
    ids = torch.randint(0, 50, (2, 12))
    logits = torch.randn(2, 2, 12, 50)
    base = medusa.medusa_loss(logits, ids, target_start=6)
    changed = logits.clone()
    changed[0, :, :6 - 2] = torch.randn(2, 4, 50)  # head 1 at t < 4 predicts targets t + 2 < 6
    changed[1, :, :6 - 3] = torch.randn(2, 3, 50)  # head 2 at t < 3 predicts targets t + 3 < 6
    assert medusa.medusa_loss(changed, ids, target_start=6) == pytest.approx(float(base))
    assert medusa.medusa_loss(changed, ids) != pytest.approx(float(medusa.medusa_loss(logits, ids)))


def test_training_split_reproduces_the_whole_graph(trained, prompts):
    compiled, _, _ = trained
    gm = compiled.graph_module
    backbone, heads = medusa.split_backbone_and_heads(gm)
    ids = prompts[:3]
    whole = gm(ids)[1]
    torch.testing.assert_close(heads(backbone(ids)[0])[0], whole, rtol=0, atol=0)
    # the split shares the parameters: what training updates is what the model uses
    assert get_attr(heads, "medusa_heads.0.0.linear.weight") is get_attr(gm, "medusa_heads.0.0.linear.weight")


def test_greedy_medusa_equals_plain_greedy_on_20_heldout_prompts_eager(trained, prompts):
    compiled, _, _ = trained
    lm = medusa.decoder(compiled, "eager")
    accepted = []
    for prompt in prompts:
        plain = greedy_generate(lm, prompt, NEW_TOKENS)
        fast = medusa.generate(compiled, prompt, NEW_TOKENS)
        assert fast.tokens == plain.tokens
        accepted.append(fast.mean_accepted)
        assert fast.forwards < plain.forwards + 1
    # trained heads get guesses accepted: fewer forwards than tokens on average
    assert sum(accepted) / len(accepted) > 1.2


def test_tree_attention_on_the_eager_path_without_fused_attention(trained, prompts):
    """No fuse_attention: the tree mask replaces the model's own causal mask (eager attention ops)
    and decoding is still exactly plain greedy, step for step as on the fused graph."""
    from fxforge.ir.graph import set_attr
    from fxforge.passes.add_kv_cache import KV_META

    compiled, _, _ = trained
    gm, ids = fused_graph(fused=False)
    unfused = with_heads(CompiledModel(gm, "eager", example_inputs=(ids,)), NUM_HEADS)
    for name, value in compiled.graph_module.named_parameters():
        if name.startswith("medusa"):
            set_attr(unfused.graph_module, name, value.detach().clone())
    lm = medusa.decoder(unfused, "eager")
    assert lm.layout["attention"] == "eager"
    for prompt in prompts[:10]:
        plain = greedy_generate(lm, prompt, NEW_TOKENS)
        fast = medusa.generate(unfused, prompt, NEW_TOKENS)
        reference = medusa.generate(compiled, prompt, NEW_TOKENS)
        assert fast.tokens == plain.tokens == reference.tokens
        assert fast.accepted_per_step == reference.accepted_per_step


@pytest.mark.slow
def test_greedy_medusa_equals_plain_greedy_on_20_heldout_prompts_onnx(trained, prompts):
    compiled, _, _ = trained
    eager_lm = medusa.decoder(compiled, "eager")
    onnx_lm = medusa.decoder(compiled, "onnx")
    assert onnx_lm.backend == "onnx" and onnx_lm.num_heads == NUM_HEADS
    session = onnx_lm.runner.session
    assert [i.name for i in session.get_inputs()] == [
        "input_ids", "position_ids", "tree_mask", "past_key_0", "past_value_0", "past_key_1", "past_value_1"]
    assert len(session.get_outputs()) == 2 + 4  # logits, head logits, present K/V of 2 layers
    for prompt in prompts:
        plain = greedy_generate(eager_lm, prompt, NEW_TOKENS)
        assert greedy_generate(onnx_lm, prompt, NEW_TOKENS).tokens == plain.tokens
        assert medusa.generate(compiled, prompt, NEW_TOKENS, backend="onnx").tokens == plain.tokens


@pytest.mark.slow
def test_export_onnx_with_heads_matches_eager(trained, prompts, tmp_path):
    from fxforge.backends.onnx.backend import OnnxRunner
    from fxforge.runtime.decoding import CachedLM, with_kv_cache

    compiled, _, _ = trained
    path = medusa.export_onnx(compiled, tmp_path / "medusa.onnx")
    runner = OnnxRunner(path)
    assert runner.input_names == ["input_ids", "position_ids", "tree_mask", "past_key_0", "past_value_0",
                                  "past_key_1", "past_value_1"]
    onnx_lm = CachedLM(with_kv_cache(compiled.graph_module), runner, "onnx")
    eager_lm = CachedLM(onnx_lm.graph_module, onnx_lm.graph_module)
    prompt = prompts[2:3]
    got = onnx_lm.forward(prompt, onnx_lm.empty_past(1), 0)
    ref = eager_lm.forward(prompt, eager_lm.empty_past(1), 0)
    assert got.head_logits.shape == (NUM_HEADS, 1, prompt.shape[1], ref.logits.shape[-1])
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.head_logits, ref.head_logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(got.present, ref.present):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_typical_acceptance_samples_and_reports_its_rate(trained, prompts):
    compiled, _, _ = trained
    first = medusa.generate(compiled, prompts[0], NEW_TOKENS, mode="typical", temperature=0.7, seed=1)
    again = medusa.generate(compiled, prompts[0], NEW_TOKENS, mode="typical", temperature=0.7, seed=1)
    assert first.tokens == again.tokens and len(first.tokens) == NEW_TOKENS
    assert 0.0 <= first.acceptance_rate <= 1.0
    assert first.mean_accepted >= 1.0 and first.extra["mode"] == "typical"
    rates = [medusa.generate(compiled, p, NEW_TOKENS, mode="typical", temperature=1.0, seed=s).acceptance_rate
             for s, p in enumerate(prompts[:4])]
    assert max(rates) > 0.0


def test_custom_tree_and_tree_from_measured_accuracies(trained, prompts):
    compiled, report, _ = trained
    tree = medusa.tree_from_report(report, num_nodes=10)
    assert tree.num_nodes == 11 and tree.depth <= NUM_HEADS
    lm = medusa.decoder(compiled)
    plain = greedy_generate(lm, prompts[1], NEW_TOKENS).tokens
    assert medusa.generate(compiled, prompts[1], NEW_TOKENS, tree=tree).tokens == plain
    assert medusa.generate(compiled, prompts[1], NEW_TOKENS, tree=[(0,), (0, 0)]).tokens == plain
    # heads inside the graph (every tree node) or apart (one position per step): same tokens
    whole = medusa.decoder(compiled, split_heads=False)
    assert whole.heads_runner is None and lm.heads_runner is not None
    assert medusa.generate(compiled, prompts[1], NEW_TOKENS, tree=tree, lm=whole).tokens == plain


def test_bad_inputs_are_refused_clearly(trained, prompts):
    compiled, _, _ = trained
    with pytest.raises(InputError, match="mode must be"):
        medusa.generate(compiled, prompts[0], 4, mode="beam")
    with pytest.raises(InputError, match="temperature > 0"):
        medusa.generate(compiled, prompts[0], 4, mode="typical")
    with pytest.raises(InputError, match="4 levels deep but the model has 3 heads"):
        medusa.generate(compiled, prompts[0], 4, tree=[(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)])
    with pytest.raises(InputError, match="no parent"):
        medusa.generate(compiled, prompts[0], 4, tree=[(0,), (1, 0)])
    with pytest.raises(InputError, match="tokenizer"):
        medusa.train_heads(compiled, ["some text"], steps=1)
    plain = fxforge.compile(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(InputError, match="no Medusa heads"):
        medusa.train_heads(plain, None)
