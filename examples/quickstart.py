"""Quickstart (what `make demo` runs): compile a real sentence encoder to ONNX Runtime.

Loads the pretrained all-MiniLM-L6-v2 encoder from the model zoo, compiles it through the
default pipeline to the ONNX backend, prints the compile report, then checks that ONNX Runtime
and PyTorch agree on sentences the compiler never saw and compares their latency.
"""
import statistics
import time

import torch

import fxforge
from fxforge.models import get_model
from fxforge.models.minilm import minilm_sentences, tokenize


def median_ms(fn, repeats: int = 20) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(2)
    zoo = get_model("minilm")
    print(f"model: {zoo.description}\n")

    compiled = fxforge.compile(zoo.model, zoo.args, zoo.kwargs, backend="onnx",
                               backend_options={"threads": 2})
    print(compiled.report, "\n")

    batch = tokenize(minilm_sentences()[24:40])  # 16 sentences of another length
    with torch.no_grad():
        reference = zoo.model(**batch)
    embeddings = compiled(**batch)
    cosine = torch.nn.functional.cosine_similarity(embeddings, reference, dim=-1)
    print(f"ONNX Runtime vs PyTorch on {len(cosine)} new sentences, shape {tuple(batch['input_ids'].shape)}:")
    print(f"  max abs difference {float((embeddings - reference).abs().max()):.2e}, "
          f"min cosine {float(cosine.min()):.8f}")

    with torch.no_grad():
        torch_ms = median_ms(lambda: zoo.model(**batch))
    onnx_ms = median_ms(lambda: compiled(**batch))
    print(f"latency (median of 20, 2 threads): PyTorch eager {torch_ms:.1f} ms, "
          f"ONNX Runtime {onnx_ms:.1f} ms ({torch_ms / onnx_ms:.2f}x)")


if __name__ == "__main__":
    main()
