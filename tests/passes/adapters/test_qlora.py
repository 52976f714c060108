"""QLoRA-style composition: adapters on fxforge::linear_wq layers train on the frozen int base,
merge into float linears, and export to ONNX."""
import torch
import torch.nn.functional as F

from fxforge.backends.onnx.backend import OnnxRunner, export_onnx
from fxforge.ir.graph import add_attr, get_attr, linear_sites, summarize
from fxforge.ir.ops.linear_wq import pack_bits
from fxforge.passes.adapters.add_adapters import AddAdapters
from fxforge.passes.adapters.merge_adapters import MergeAdapters
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass

WQ = torch.ops.fxforge.linear_wq.default


def _quantize_by_hand(gm, group_size=16):
    """4-bit asymmetric RTN of every linear into linear_wq (what the `quantize` pass emits)."""
    for site in linear_sites(gm, include_lm_head=True):
        w = get_attr(gm, site.weight_name).detach()
        groups = w.reshape(w.shape[0], -1, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        scales = ((high - low) / 15).clamp_min(1e-5)
        zeros = (-low / scales).round().clamp(0, 15)
        codes = (groups / scales[..., None] + zeros[..., None]).round().clamp(0, 15).reshape(w.shape)
        path = site.module_path
        node = site.node
        args = [add_attr(gm, f"{path}.qweight", pack_bits(codes.to(torch.uint8), 4), buffer=True, before=node),
                add_attr(gm, f"{path}.scales", scales, buffer=True, before=node),
                add_attr(gm, f"{path}.zeros", zeros.to(torch.uint8), buffer=True, before=node)]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(WQ, (node.args[0], *args, node.args[2], 4, group_size))
        new.meta["module_path"] = node.meta.get("module_path", "")
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    from fxforge.ir.graph import erase_dead, finalize

    erase_dead(gm)
    return finalize(gm)


def test_adapters_train_on_a_quantized_base_and_the_merge_exports(mlp, tmp_path):
    zoo, gm = mlp
    quantized = _quantize_by_hand(gm)
    for p in quantized.parameters():
        p.requires_grad_(False)
    assert summarize(quantized).ops["fxforge.linear_wq"] == 3
    ctx = PassContext(example_inputs=tuple(zoo.args))
    adapted = run_pass(AddAdapters(method="lora", rank=4, targets=("fc1", "fc2")), quantized, ctx)
    ops = summarize(adapted).ops
    assert ops["fxforge.linear_wq"] == 3 and ops["fxforge.lora_linear"] == 0 and ops["aten.linear"] == 0
    assert sorted(n for n, p in adapted.named_parameters() if p.requires_grad) == \
        ["fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B"]
    packed_before = adapted.fc1.qweight.clone()
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(10, 32, generator=g)
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=2e-2)
    batches = [torch.randn(16, 32, generator=g) for _ in range(4)]
    losses = []
    for step in range(100):
        x = batches[step % 4]
        loss = F.cross_entropy(adapted(x)[0], (x @ teacher.t()).argmax(-1))
        opt.zero_grad()
        loss.backward()  # through fc3's frozen int base and into fc2/fc1's adapters
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) < 0.6 * sum(losses[:4])
    assert torch.equal(adapted.fc1.qweight, packed_before)
    merged = run_pass(MergeAdapters(), adapted, ctx)
    ops = summarize(merged).ops
    assert ops["aten.linear"] == 2 and ops["fxforge.linear_wq"] == 1  # fc3 stays quantized
    x = torch.randn(7, 32)
    torch.testing.assert_close(merged(x)[0], adapted(x)[0].detach(), atol=1e-4, rtol=1e-4)
    path = export_onnx(merged, zoo.args, tmp_path / "qlora_merged.onnx")
    torch.testing.assert_close(OnnxRunner(path)(x)[0], adapted(x)[0].detach(), atol=2e-2, rtol=2e-2)


def test_methods_needing_the_float_weight_skip_quantized_layers(mlp):
    zoo, gm = mlp
    quantized = _quantize_by_hand(gm)
    ctx = PassContext(example_inputs=tuple(zoo.args))
    from fxforge.passes.pipeline import PipelineReport

    report = PipelineReport()
    out = run_pass(AddAdapters(method="pissa", rank=4, targets=("fc1",)), quantized, ctx, report=report)
    assert report.records[0].sites == 0
    assert "needs the float base weight" in report.records[0].skipped[0][1]
    assert summarize(out).ops["fxforge.linear_wq"] == 3
