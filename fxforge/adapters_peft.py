"""Adapters in Hugging Face PEFT's format: a directory PEFT's `PeftModel.from_pretrained` loads.

    save_adapters(compiled, "out/", format="peft")    # adapter_config.json + adapter_model.safetensors
    PeftModel.from_pretrained(hf_model, "out/")       # the same adapters, in PEFT
    load_adapters(compiled, "peft-dir/")             # a directory PEFT's save_pretrained wrote

PEFT's layout (peft 0.21, `get_peft_model_state_dict` + `LoraConfig.save_pretrained`): tensors
under `base_model.model.<module path>.lora_A.weight` (r, in), `.lora_B.weight` (out, r) and, with
DoRA, `.lora_magnitude_vector` (out,); the config's scaling is lora_alpha / r (lora_alpha / √r with
use_rslora), per layer through `rank_pattern` / `alpha_pattern` (regex keys, the first one whose
`(.*\\.)?(key)$` matches the module path wins). GPT-2's Conv1D layers store their weight as
(in, out): PEFT marks them `fan_in_fan_out`, but the LoRA tensors keep the (r, in) / (out, r)
orientation, so they map onto fxforge's canonical (out, in) layers unchanged.

Which of fxforge's methods PEFT also has, with the same math and a file that is the whole
adapter: lora, rslora, eva (saved as plain LoRA with per-layer rank/alpha patterns), dora
(`use_dora`), bone (PEFT's MiSS tuner, peft_type "MISS": `.miss_block` is fxforge's miss_D
(r, out) for bone_form="miss", init_weights=true, and bone_B (out/r, r, r) for bone_form="bat",
init_weights="bat"), and pissa, olora, lora_ga, which rewrite the base weight: given the
original model (`base_model=`) they are written as PEFT writes them for the original weights,
plain LoRA of rank 2r (adapters_peft_residual.py). The others are refused by name
(`NO_PEFT_FORMAT` says why for each). Loading reads LoRA, DoRA and MiSS directories.

Loading reads JSON and safetensors only (nothing from the directory is executed), checks the
config, every tensor's name, shape, dtype and finiteness and every layer's method, rank and
scaling against the graph, and changes nothing unless all of it fits.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fxforge.adapters_io import AdapterLoadError, assign_adapter_tensors, graph_module_of, layer_set_problems, tensor_problem
from fxforge.adapters_peft_residual import RESIDUAL_LORA, ResidualConversionError, residual_as_lora
from fxforge.atomic import atomic_directory
from fxforge.errors import FxforgeError
from fxforge.finite_checks import nonfinite_problem
from fxforge.ir.graph import get_attr
from fxforge.passes.adapters.common import adapter_records

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
README_FILE = "README.md"  # PEFT's save_pretrained writes a model card; we may replace it
KEY_PREFIX = "base_model.model."

# fxforge role -> suffix of PEFT's tensor name after the module path
PEFT_SUFFIX = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector",
               "miss_D": "miss_block", "bone_B": "miss_block"}
PLAIN_LORA = ("lora", "rslora", "eva")  # fxforge::lora_linear(x, W, b, A, B, s) on the untouched W
DORA = "dora"
MISS = "bone"  # PEFT's MiSS tuner; the record's tensor role says which form (miss_D or bone_B)

NO_PEFT_FORMAT = {
    "sorsa": "PEFT has no SORSA tuner, and SORSA rewrites the base weight",
    "loldu": "PEFT has no LoLDU tuner, and LoLDU rewrites the base weight",
    "svfit": "PEFT has no SVFit tuner, and SVFit rewrites the base weight",
    "lora_sb": "PEFT has no LoRA-SB tuner (its trainable r×r matrix between frozen factors)",
}

# Config options that change what a PEFT LoRA adapter computes, and the value meaning "off".
_MUST_BE_OFF = {
    "modules_to_save": "it trains whole copies of other modules (classifier heads, ...), which fxforge "
                       "adapters do not hold",
    "lora_bias": "it adds a trained bias to lora_B; fxforge adapters have none",
    "layer_replication": "it duplicates decoder layers",
    "use_qalora": "QALoRA pools the input per group before lora_A",
    "use_bdlora": "block-diagonal LoRA is a different factorization",
    "alora_invocation_tokens": "activated LoRA applies only after invocation tokens",
    "trainable_token_indices": "it trains embedding rows, which fxforge adapters do not hold",
    "target_parameters": "it adapts nn.Parameters (MoE experts), not linear layers",
    "megatron_config": "Megatron parallel linears are not fxforge layers",
    "arrow_config": "Arrow routing mixes several adapters",
}
# Options that describe the file or training only (dropout is off at inference).
_NEUTRAL_MISS = {"peft_type", "r", "init_weights", "mini_r", "miss_dropout", "bias", "target_modules",
                 "exclude_modules", "layers_to_transform", "layers_pattern", "inference_mode", "task_type",
                 "base_model_name_or_path", "revision", "peft_version", "auto_mapping"}
_NEUTRAL = {
    "peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "bias",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out",
    "lora_dropout", "init_lora_weights", "inference_mode", "task_type", "base_model_name_or_path",
    "revision", "peft_version", "auto_mapping", "megatron_core", "qalora_group_size", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "kasa_config", "ensure_weight_tying", "runtime_config",
}
# init_lora_weights values after which the base weight is untouched (only A/B's start differs).
_BASE_KEEPING_INITS = (True, False, "gaussian", "eva")


class AdapterSaveError(FxforgeError, ValueError):
    """The adapters cannot be written in the requested format (nothing was written)."""


# --------------------------------------------------------------------------- save


def save_peft(compiled: Any, directory: str | Path, base_model: Any = None) -> Path:
    """Write `compiled`'s adapters as a PEFT LoRA directory; return it.

    base_model: the model that was compiled; needed only for pissa, olora and lora_ga, whose
    change from the original weights is written as plain LoRA of rank 2r (PEFT's conversion).

    The directory is assembled aside and swapped in atomically (fxforge.atomic). An existing
    directory is replaced only if it holds nothing but a previous PEFT adapter (config, weights,
    README.md), so no unrelated file is ever deleted.
    """
    gm = graph_module_of(compiled)
    records = adapter_records(gm)
    if not records:
        raise AdapterSaveError("save_adapters(format='peft'): the model has no adapters; compile it with "
                               "passes='add_adapters(...)' (adapters that were merged are part of the base weights)")
    _check_methods(records, base_model)
    records, values = _as_written(gm, records, base_model)
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in sorted(values.items()):
        for role, value in layer.items():
            tensors[f"{KEY_PREFIX}{path}.{PEFT_SUFFIX[role]}"] = value.detach().contiguous().cpu()
    bad = [f"{key} {problem}" for key, t in tensors.items() if (problem := nonfinite_problem(t))]
    if bad:
        raise AdapterSaveError("save_adapters(format='peft'): refusing to write non-finite adapter tensors "
                               "(nothing was written):\n  - " + "\n  - ".join(bad))
    is_miss = _kind(next(iter(records.values()))) in ("MISS", "BAT")
    config = miss_config(records) if is_miss else peft_config(gm, records)
    directory = Path(directory)
    _check_replaceable(directory)
    with atomic_directory(directory) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def _as_written(gm: torch.fx.GraphModule, records: dict[str, dict[str, Any]], base_model: Any
                ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, torch.Tensor]]]:
    """(records as PEFT will see them, {module path: {role: tensor}}): residual layers become plain
    LoRA layers of their converted rank with scale 1; the others are written as they are."""
    written, values, problems = {}, {}, []
    for path, record in records.items():
        if record["method"] not in RESIDUAL_LORA:
            written[path] = record
            values[path] = {role: get_attr(gm, name) for role, name in record["tensors"].items()}
            continue
        try:
            values[path], rank = residual_as_lora(gm, path, record, base_model, _is_conv1d(gm, record))
        except ResidualConversionError as exc:
            problems.append(str(exc))
            continue
        written[path] = {**record, "method": "lora", "rank": rank, "scale": 1.0}
    if problems:
        raise AdapterSaveError("save_adapters(format='peft'): the residual adapters cannot be written relative "
                               "to base_model (nothing was written):\n  - " + "\n  - ".join(problems))
    return written, values


def _kind(record: dict[str, Any]) -> str | None:
    """PEFT's spelling of one adapted layer: "LORA", "DORA" (LoRA with use_dora), "MISS", "BAT"
    (MiSS with init_weights="bat"), or None where PEFT has none."""
    method = record["method"]
    if method in PLAIN_LORA or method in RESIDUAL_LORA:
        return "LORA"
    if method == DORA:
        return "DORA"
    if method == MISS:
        return "BAT" if "bone_B" in record["tensors"] else "MISS"
    return None


def _check_methods(records: dict[str, dict[str, Any]], base_model: Any = None) -> None:
    """Refuse methods PEFT cannot express, fused layers, and mixes one PEFT config cannot hold."""
    problems = []
    residual = sorted(path for path, record in records.items() if record["method"] in RESIDUAL_LORA)
    if residual and base_model is None:
        problems.append(f"{', '.join(residual[:4])}{' ...' if len(residual) > 4 else ''}: "
                        f"{records[residual[0]]['method']} rewrote the base weight, and a PEFT directory is "
                        f"loaded onto the original model: pass base_model=<the model you compiled> so the "
                        f"whole change is written as LoRA of rank 2r (what PEFT's "
                        f"path_initial_model_for_weight_conversion does)")
    for path, record in sorted(records.items()):
        method = record["method"]
        if record.get("fused_from"):
            problems.append(f"{path}: fused by fuse_projections from {', '.join(record['fused_from'])}; PEFT "
                            f"adapts the separate layers: save the adapters before fuse_projections runs")
        elif method in NO_PEFT_FORMAT:
            problems.append(f"{path}: method '{method}': {NO_PEFT_FORMAT[method]}")
        elif _kind(record) is None:
            problems.append(f"{path}: method '{method}' has no PEFT counterpart known to fxforge")
    kinds = {_kind(record) for record in records.values()}
    if not problems and len(kinds) > 1:
        problems.append(f"layers of different PEFT kinds in one model ({', '.join(sorted(kinds))}): one PEFT "
                        f"config holds one kind (one peft_type, one use_dora, one MiSS form)")
    if not problems and kinds <= {"MISS", "BAT"} and len({r["rank"] for r in records.values()}) > 1:
        problems.append("MiSS layers of different ranks: PEFT's MissConfig has one r and no rank_pattern")
    if problems:
        raise AdapterSaveError(
            "save_adapters(format='peft'): these adapters have no PEFT form (nothing was written):\n  - "
            + "\n  - ".join(problems) + f"\nPEFT-compatible methods: {', '.join((*PLAIN_LORA, DORA, MISS))}, "
            f"and with base_model= {', '.join(RESIDUAL_LORA)}. "
            "Save them in fxforge's format (save_adapters(compiled, 'adapter.safetensors')), or fold them "
            "into the weights with compiled.merge_adapters() and save the model.")


def peft_config(gm: torch.fx.GraphModule, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The adapter_config.json PEFT reads for these (checked, PEFT-expressible) adapters.

    target_modules are the full module paths, so PEFT adapts exactly these layers. PEFT's
    scaling is alpha/r (alpha/√r with use_rslora); each layer's alpha is chosen to give its
    recorded scale, and layers that differ from the most common (rank, alpha) get patterns.
    """
    rslora = all(record["method"] == "rslora" for record in records.values())
    per_layer = {path: (record["rank"], _peft_alpha(record["scale"], record["rank"], rslora))
                 for path, record in records.items()}
    rank, alpha = Counter(per_layer.values()).most_common(1)[0][0]
    conv1d = [_is_conv1d(gm, record) for record in records.values()]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(p): r for p, (r, _) in sorted(per_layer.items()) if r != rank},
        "alpha_pattern": {re.escape(p): a for p, (_, a) in sorted(per_layer.items()) if a != alpha},
        "target_modules": sorted(records),
        "use_rslora": rslora,
        "use_dora": all(record["method"] == DORA for record in records.values()),
        "fan_in_fan_out": all(conv1d),  # PEFT flips it (with a warning) for layers of the other kind
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }


def miss_config(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The adapter_config.json of PEFT's MiSS tuner for bone adapters (one form, one rank: checked)."""
    record = next(iter(records.values()))
    return {
        "peft_type": "MISS",
        "task_type": None,
        "r": record["rank"],
        "init_weights": "bat" if _kind(record) == "BAT" else True,
        "mini_r": 1,
        "miss_dropout": 0.0,
        "target_modules": sorted(records),
        "bias": "none",
        "modules_to_save": None,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }


def _peft_alpha(scale: float, rank: int, rslora: bool) -> float:
    alpha = scale * (math.sqrt(rank) if rslora else rank)
    return int(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 else alpha  # 8, not 8.0, as PEFT writes it


def _is_conv1d(gm: torch.fx.GraphModule, record: dict[str, Any]) -> bool:
    """Whether the adapted layer was a transformers Conv1D (weight stored (in, out)) in the user's model."""
    names = set(record.get("nodes", ()))
    for node in gm.graph.nodes:
        if node.name in names:
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                return list(stack.values())[-1][1].rsplit(".", 1)[-1] == "Conv1D"
    return False


def _check_replaceable(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise AdapterSaveError(f"save_adapters(format='peft'): {directory} is a file; PEFT adapters are a "
                               f"directory (adapter_config.json + adapter_model.safetensors). Name a directory.")
    if directory.is_dir():
        others = sorted(p.name for p in directory.iterdir() if p.name not in (CONFIG_FILE, WEIGHTS_FILE, README_FILE))
        if others:
            raise AdapterSaveError(
                f"save_adapters(format='peft'): refusing to replace {directory}: it holds files that are not a "
                f"PEFT adapter ({', '.join(others[:5])}). Save the adapters into their own directory.")


# --------------------------------------------------------------------------- load


def is_peft_dir(path: str | Path) -> bool:
    """Whether `path` is a PEFT adapter directory (it has adapter_config.json)."""
    return (Path(path) / CONFIG_FILE).is_file()


def load_peft(compiled: Any, directory: str | Path) -> list[str]:
    """Load a PEFT LoRA / DoRA directory into `compiled`'s adapters; return the layers loaded.

    The graph must already hold adapters of the same kind on exactly the directory's layers,
    with the same ranks and scalings (AdapterLoadError names the add_adapters(...) that fits).
    All or nothing, with the same checks and dtype rule as fxforge's own format.
    """
    gm = graph_module_of(compiled)
    directory = Path(directory)
    config = _read_config(directory)
    tensors = _read_tensors(directory)
    layers = _layers(tensors, directory)
    records = adapter_records(gm)
    targets = _match(config, layers, records, gm, directory)
    assign_adapter_tensors(gm, targets)
    return sorted(layers)


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterLoadError(f"load_adapters: {directory} has no {CONFIG_FILE}; a PEFT adapter directory holds "
                               f"{CONFIG_FILE} and {WEIGHTS_FILE} (written by PeftModel.save_pretrained)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterLoadError(f"load_adapters: {path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterLoadError(f"load_adapters: {path} must hold a JSON object, got {type(config).__name__}")
    problems = []
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "MISS"):
        problems.append(f"peft_type is {peft_type!r}; fxforge reads PEFT's 'LORA' adapters (with or without "
                        f"use_dora) and 'MISS' adapters (fxforge's bone method)")
        raise AdapterLoadError(f"load_adapters: {path} cannot be loaded (nothing was changed):\n  - "
                               + "\n  - ".join(problems))
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} trains the base layers' biases; fxforge adapters keep biases "
                        f"frozen (train with bias='none')")
    if peft_type == "LORA":
        init = config.get("init_lora_weights", True)
        if init not in _BASE_KEEPING_INITS:
            problems.append(f"init_lora_weights={init!r} rewrites the base weights when PEFT loads the adapter; "
                            f"fxforge cannot reproduce that from the file (convert it to plain LoRA with PEFT's "
                            f"path_initial_model_for_weight_conversion)")
    elif config.get("init_weights", True) not in (True, False, "bat"):
        problems.append(f"init_weights={config['init_weights']!r}: MiSS's 'mini' form (a block repeated along the "
                        f"outputs) is not an fxforge form; fxforge has MiSS (init_weights=true) and Bat ('bat')")
    for key, why in _MUST_BE_OFF.items():
        if config.get(key):
            problems.append(f"{key}={config[key]!r}: not supported, {why}")
    neutral = _NEUTRAL if peft_type == "LORA" else _NEUTRAL_MISS
    for key, value in sorted(config.items()):
        if key not in neutral and key not in _MUST_BE_OFF and value not in (None, False, {}, [], ""):
            problems.append(f"{key}={value!r}: an option fxforge does not know; it may change what the adapter "
                            f"computes")
    if peft_type == "MISS":
        config = {"lora_alpha": 1, **config}  # MiSS has no scaling: its layers' scale is 1
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
            problems.append(f"{key} must be a positive number, got {config.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            problems.append(f"{key} must be an object, got {config.get(key)!r}")
    if problems:
        raise AdapterLoadError(f"load_adapters: {path} cannot be loaded (nothing was changed):\n  - "
                               + "\n  - ".join(problems))
    return config


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        hint = (" (adapter_model.bin is a pickle, which fxforge never loads: re-save with "
                "save_pretrained(safe_serialization=True))") if (directory / "adapter_model.bin").exists() else ""
        raise AdapterLoadError(f"load_adapters: {directory} has no {WEIGHTS_FILE}{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types (and OSError) for bad bytes
        raise AdapterLoadError(f"load_adapters: {path} is not a readable safetensors file "
                               f"({type(exc).__name__}: {exc})") from None


def _layers(tensors: dict[str, torch.Tensor], directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {fxforge role: tensor}} from PEFT's key names; unknown keys are an error.
    A MiSS block is named by its PEFT suffix; `_match` gives it the role the graph's record has."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        for role, suffix in PEFT_SUFFIX.items():
            if role == "bone_B":
                continue  # the same suffix as miss_D
            tail = "." + suffix
            # older PEFT versions name the magnitude `lora_magnitude_vector.weight`
            for ending in (tail, tail + ".weight") if role == "magnitude" else (tail,):
                if key.startswith(KEY_PREFIX) and key.endswith(ending):
                    layers.setdefault(key[len(KEY_PREFIX):-len(ending)], {})[role] = tensor
                    break
            else:
                continue
            break
        else:
            unknown.append(key)
    if unknown:
        raise AdapterLoadError(
            f"load_adapters: {directory / WEIGHTS_FILE} holds tensors that are not PEFT LoRA/DoRA layer tensors "
            f"({', '.join(sorted(unknown)[:6])}); expected '{KEY_PREFIX}<module>.lora_A.weight', "
            f"'.lora_B.weight' and (DoRA) '.lora_magnitude_vector', or (MiSS) '.miss_block' (nothing was changed)")
    if not layers:
        raise AdapterLoadError(f"load_adapters: {directory / WEIGHTS_FILE} holds no adapter tensors")
    return layers


def pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key whose `(.*\\.)?(key)$` matches."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module_path):
                return value
        except re.error:
            continue  # PEFT would fail on it too; a key that is no regex matches nothing
    return default


def _match(config: dict[str, Any], layers: dict[str, dict[str, torch.Tensor]], records: dict[str, Any],
           gm: torch.fx.GraphModule, directory: Path) -> dict[str, torch.Tensor]:
    """{graph attribute: tensor} once every layer and tensor fits the graph; else one error listing all."""
    dora = bool(config.get("use_dora"))
    rslora = bool(config.get("use_rslora"))
    miss = config["peft_type"] == "MISS"
    wanted = {"BAT" if config.get("init_weights") == "bat" else "MISS"} if miss else {"DORA" if dora else "LORA"}
    spelled = {"LORA": "LoRA", "DORA": "DoRA", "MISS": "MiSS (bone_form='miss')", "BAT": "Bat (bone_form='bat')"}
    problems: list[str] = layer_set_problems(records, layers, "the directory")
    targets: dict[str, torch.Tensor] = {}
    for path in sorted(set(layers) & set(records)):
        record, given = records[path], dict(layers[path])
        rank = pattern_value(config.get("rank_pattern") or {}, path, config["r"])
        alpha = pattern_value(config.get("alpha_pattern") or {}, path, config["lora_alpha"])
        scale = alpha / (math.sqrt(rank) if rslora else rank) if isinstance(rank, int) and rank > 0 else None
        if miss:
            scale = 1.0
            if "bone_B" in record["tensors"] and "miss_D" in given:
                given["bone_B"] = given.pop("miss_D")
        if _kind(record) not in wanted:
            problems.append(f"{path}: the graph's adapter is '{record['method']}'"
                            f"{' (' + spelled[_kind(record)] + ')' if _kind(record) else ''} but the directory "
                            f"holds {spelled[next(iter(wanted))]}")
            continue
        if rank != record["rank"]:
            problems.append(f"{path}: rank {rank} in the directory's config but {record['rank']} in the graph")
        elif scale is None or not math.isclose(scale, record["scale"], rel_tol=1e-6):
            problems.append(f"{path}: scaling {scale} (lora_alpha {alpha} / {'√' if rslora else ''}r) in the "
                            f"directory but {record['scale']} in the graph")
        roles = set(record["tensors"])
        for role in sorted(set(given) - roles):
            problems.append(f"{path}: the directory has {PEFT_SUFFIX[role]} but the graph's adapter takes no such tensor")
        for role in sorted(roles):
            key = f"{KEY_PREFIX}{path}.{PEFT_SUFFIX[role]}"
            if role not in given:
                problems.append(f"{key}: missing from the directory")
                continue
            have, value = get_attr(gm, record["tensors"][role]), given[role]
            problem = tensor_problem(key, value, have, "the directory",
                                     f"compile the model in {value.dtype} or cast the file")
            if problem:
                problems.append(problem)
            else:
                targets[record["tensors"][role]] = value
    if problems:
        raise AdapterLoadError(
            f"load_adapters: {directory} does not fit this model (nothing was changed):\n  - "
            + "\n  - ".join(problems) + f"\nThe directory's adapters fit a model compiled with "
            f"{_suggested_pass(config, layers)}.")
    return targets


def _suggested_pass(config: dict[str, Any], layers: dict[str, Any]) -> str:
    targets = sorted(layers)
    shown = targets if len(targets) <= 4 else [*targets[:4], "..."]
    if config["peft_type"] == "MISS":
        form = "bat" if config.get("init_weights") == "bat" else "miss"
        return f"passes=\"add_adapters(method=bone,bone_form={form},rank={config.get('r')},targets={shown})\""
    method = DORA if config.get("use_dora") else ("rslora" if config.get("use_rslora") else "lora")
    return (f"passes=\"add_adapters(method={method},rank={config.get('r')},alpha={config.get('lora_alpha')},"
            f"targets={shown})\"" + (" (plus rank_pattern/alpha_pattern per layer)"
                                     if config.get("rank_pattern") or config.get("alpha_pattern") else ""))
