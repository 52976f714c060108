"""Adapted, merged and sparsified models keep their pass metadata through save/load."""
import torch

import fxforge
from fxforge.adapters_io import save_adapters
from fxforge.models import get_model
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import Pipeline


def test_adapted_model_saves_loads_and_still_merges(tmp_path):
    mlp = get_model("mlp")
    compiled = fxforge.compile(mlp.model, mlp.args, passes="add_adapters(method=lora,rank=4,targets=[fc1,fc2])")
    for p in compiled.trainable_parameters():  # non-zero B so merging changes the weights
        torch.nn.init.normal_(p, std=0.1)
    compiled.save(tmp_path / "adapted")
    loaded = fxforge.load(tmp_path / "adapted")
    torch.testing.assert_close(loaded(*mlp.args), compiled(*mlp.args), rtol=0, atol=0)
    assert len(loaded.trainable_parameters()) == len(compiled.trainable_parameters()) == 4
    assert save_adapters(loaded, tmp_path / "adapters.safetensors").is_file()  # finds the records

    merged, report = Pipeline("merge_adapters(keep=True)").run(loaded.graph_module, PassContext(example_inputs=mlp.args))
    assert report.records[0].sites == 2
    merged_model = fxforge.CompiledModel(merged, example_inputs=mlp.args)
    merged_model.save(tmp_path / "merged")
    reloaded = fxforge.load(tmp_path / "merged").graph_module
    unmerged, report = Pipeline("unmerge_adapters").run(reloaded, PassContext(example_inputs=mlp.args))
    assert report.records[0].sites == 2  # the merged adapter tensors came back with the artifact
    torch.testing.assert_close(unmerged(*mlp.args)[0], compiled(*mlp.args), atol=1e-5, rtol=1e-5)


def test_compile_hands_extras_to_passes():
    # LoRA-GA takes gradients of the user's loss: compile(extras={"loss_fn": ...}) reaches it.
    mlp = get_model("mlp")
    calls = []

    def loss_fn(outputs, inputs):
        calls.append(1)
        return outputs[0].square().mean()

    batches = [torch.randn(4, 32) for _ in range(2)]
    compiled = fxforge.compile(mlp.model, mlp.args, passes="add_adapters(method=lora_ga,rank=2,targets=[fc1])",
                               calibration=batches, extras={"loss_fn": loss_fn})
    assert calls, "the pass never called the loss given through compile()"
    assert compiled.report.pipeline.records[-1].sites == 1
