"""Adapters on a real transformers model (tiny-llama, GQA): targets by module path, gradients
through attention, merge back to plain linears."""
import pytest
import torch
from testing_utils import traced_zoo

from fxforge.ir.graph import summarize
from fxforge.passes.adapters.add_adapters import AddAdapters
from fxforge.passes.adapters.merge_adapters import MergeAdapters
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import Pipeline


@pytest.fixture(scope="module")
def llama():
    return traced_zoo("tiny-llama")


@pytest.mark.slow  # traces tiny-llama (~10 s) and runs three passes on it
def test_adapt_train_and_merge_tiny_llama(llama):
    zoo, gm = llama
    inputs = tuple(zoo.kwargs.values())
    ctx = PassContext(example_inputs=inputs)
    pipeline = Pipeline([AddAdapters(method="dora", rank=4, targets=("self_attn.q_proj", "self_attn.v_proj")),
                         AddAdapters(method="pissa", rank=4, targets=("mlp.*",))])
    adapted, report = pipeline.run(gm, ctx)
    assert [r.sites for r in report.records] == [4, 6]  # 2 layers x (q, v) and x (gate, up, down)
    ops = summarize(adapted).ops
    assert ops["fxforge.dora_linear"] == 4 and ops["fxforge.lora_linear"] == 6
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 * 3 + 6 * 2 and all("layers." in n for n in trainable)
    assert not any(p.requires_grad for n, p in adapted.named_parameters() if n.endswith(".weight"))
    logits = adapted(*inputs)[0]
    logits.float().logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in adapted.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["model.layers.0.self_attn.q_proj.lora_A"].abs().sum() == 0  # B = 0: A gets no gradient yet
    assert grads["model.layers.0.self_attn.q_proj.lora_B"].abs().sum() > 0
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
        merged, _ = Pipeline([MergeAdapters()]).run(adapted, ctx)
        assert summarize(merged).ops["fxforge.lora_linear"] == 0
        torch.testing.assert_close(merged(*inputs)[0], adapted(*inputs)[0], atol=1e-4, rtol=1e-4)
