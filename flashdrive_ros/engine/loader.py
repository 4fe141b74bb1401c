"""Checkpoint I/O: strict safetensors loading, saving in the same layout, the tiny preset.

A checkpoint directory holds config.json (nvidia/Alpamayo-1.5-10B layout) and either
model.safetensors or model-XXXXX-of-YYYYY.safetensors shards with model.safetensors.index.json.
Loading is strict: every model key must be present with the right shape and nothing else may be
in the files; any mismatch raises CheckpointError naming the keys. Nothing touches the network.
Tokenizer files are not interpreted here; `save_model(..., tokenizer_dir=)` only copies them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import AlpamayoConfig, tiny_config
from .model import AlpamayoModel

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "preprocessor_config.json")
TINY_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


class CheckpointError(RuntimeError):
    """A checkpoint directory does not match the model it should load into."""


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} not supported; use bfloat16, float16 or float32")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def resolve_dir(path: str | Path) -> Path:
    """'tiny' -> the shipped tiny checkpoint; anything else is a local directory."""
    p = TINY_DIR if str(path) == "tiny" else Path(path)
    if not p.is_dir():
        hint = " (build it with `python -m flashdrive_ros.engine.loader --make-tiny <dir>`)" if str(path) == "tiny" else ""
        raise FileNotFoundError(f"checkpoint directory {p} does not exist{hint}")
    return p


def load_config(path: str | Path) -> AlpamayoConfig:
    p = resolve_dir(path) / CONFIG_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {p.parent}")
    with open(p) as f:
        return AlpamayoConfig.from_config_json(json.load(f))


# ---- building without paying for random init -------------------------------------------------------

def _build_empty(cfg: AlpamayoConfig, dtype: torch.dtype, device: torch.device) -> AlpamayoModel:
    """Model with uninitialised storage (meta-built, then materialised); weights come from the files."""
    with torch.device("meta"):
        model = AlpamayoModel(cfg)
    model = model.to_empty(device=device).to(dtype)
    _restore_computed_buffers(model, device)
    return model


def _restore_computed_buffers(model: AlpamayoModel, device: torch.device) -> None:
    """Non-persistent buffers are not in checkpoints; after `to_empty` they hold garbage, so they
    are recomputed (float32). An unknown one is an error: a library change must not silently
    leave garbage in a buffer."""
    persistent = set(model.state_dict().keys())
    fresh = model.computed_buffers()
    for name, _ in list(model.named_buffers()):
        if name in persistent:
            continue
        if name not in fresh:
            raise CheckpointError(f"do not know how to rebuild non-persistent buffer {name!r}")
        module_name, _, buf = name.rpartition(".")
        setattr(model.get_submodule(module_name), buf, fresh[name].to(device))


# ---- reading the files -------------------------------------------------------------------------------

def _weight_files(directory: Path) -> dict[str, list[str]]:
    """file name -> keys it should hold (from the index, or the single file's own header)."""
    index = directory / INDEX_FILE
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'")
        files: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            files.setdefault(fname, []).append(key)
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise CheckpointError(f"{INDEX_FILE} names missing shard file(s): {missing}")
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        with safe_open(single, "pt") as f:
            return {SINGLE_FILE: list(f.keys())}
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")


def _fmt(keys, limit: int = 10) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_into(model: torch.nn.Module, directory: str | Path) -> None:
    """Strictly copy the checkpoint tensors of `directory` into `model` (cast to its dtypes)."""
    directory = Path(directory)
    files = _weight_files(directory)
    expected = model.state_dict()
    # Pass 1: headers only. Every problem is reported before any data is read.
    shapes: dict[str, tuple[int, ...]] = {}
    for fname, index_keys in files.items():
        with safe_open(directory / fname, "pt") as f:
            present = set(f.keys())
            absent = set(index_keys) - present
            if absent:
                raise CheckpointError(f"{fname} lacks key(s) listed in {INDEX_FILE}: {_fmt(absent)}")
            for key in present:
                if key in shapes:
                    raise CheckpointError(f"key {key!r} appears in more than one weight file")
                shapes[key] = tuple(f.get_slice(key).get_shape())
    missing = set(expected) - set(shapes)
    unexpected = set(shapes) - set(expected)
    wrong = {k: (shapes[k], tuple(expected[k].shape)) for k in set(shapes) & set(expected)
             if shapes[k] != tuple(expected[k].shape)}
    problems = []
    if missing:
        problems.append(f"missing key(s): {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s): {_fmt(unexpected)}")
    if wrong:
        problems.append("wrong shape(s): " + "; ".join(f"{k} has {s} but the model needs {e}"
                                                       for k, (s, e) in sorted(wrong.items())[:10]))
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not match the model: " + " | ".join(problems))
    # Pass 2: copy, one tensor at a time (peak extra memory = one tensor).
    with torch.no_grad():
        for fname in files:
            with safe_open(directory / fname, "pt") as f:
                for key in f.keys():
                    expected[key].copy_(f.get_tensor(key))


def load_model(path: str | Path, dtype: torch.dtype | str = torch.bfloat16,
               device: torch.device | str = "cpu") -> AlpamayoModel:
    """Build the model described by `path`/config.json and load its weights strictly.
    `path` may be "tiny" for the shipped tiny checkpoint. Returns the model in eval mode."""
    directory = resolve_dir(path)
    cfg = load_config(directory)
    model = _build_empty(cfg, resolve_dtype(dtype), torch.device(device))
    load_state_into(model, directory)
    return model.eval()


from_pretrained = load_model  # the name used in docs/DESIGN.md


# ---- writing -----------------------------------------------------------------------------------------

def _owned_cpu(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor that owns its storage: safetensors refuses tensors sharing storage, which is what
    graphs.fuse_projections leaves behind (q/k/v and gate/up weights are row slices of one buffer)."""
    t = t.detach().to("cpu").contiguous()
    if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def save_model(model: AlpamayoModel, directory: str | Path, cfg: AlpamayoConfig | None = None,
               max_shard_bytes: int = 4 * 1024 ** 3, tokenizer_dir: str | Path | None = None) -> Path:
    """Write config.json + weights (one file, or shards + index past `max_shard_bytes`).
    Tokenizer files found in `tokenizer_dir` are copied alongside. Returns the directory."""
    cfg = cfg or model.cfg
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / CONFIG_NAME, "w") as f:
        json.dump(cfg.to_config_json(), f, indent=2)
        f.write("\n")
    for old in list(directory.glob("model*.safetensors")) + [directory / INDEX_FILE]:
        old.unlink(missing_ok=True)

    state = {k: _owned_cpu(v) for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / name), metadata=meta)
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(directory / INDEX_FILE, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    for f in directory.glob("model*.safetensors"):
        f.chmod(0o644)  # safetensors writes 0600; checkpoints are meant to be shared/shipped
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
        if "tokenizer.json" not in copied:
            raise FileNotFoundError(f"no tokenizer.json in tokenizer_dir {src}")
        for n in copied:
            shutil.copyfile(src / n, directory / n)
    return directory


save_pretrained = save_model


# ---- the tiny preset ---------------------------------------------------------------------------------

def init_weights(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Deterministic random init from one torch.Generator, in parameter-name order:
    norm weights ~ 1 + N(0, std) (slightly off one so a mis-wired norm changes outputs);
    everything else (matrices, convs, embeddings, biases) ~ N(0, std)."""
    # Norm layers (LayerNorm, RMSNorm of any origin) are recognised by class name.
    norm_weights = {f"{m_name}.weight" if m_name else "weight" for m_name, m in model.named_modules()
                    if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), torch.Tensor)}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            p.copy_(noise + 1.0 if name in norm_weights else noise)


def create_tiny(seed: int = 0, cfg: AlpamayoConfig | None = None) -> AlpamayoModel:
    """The tiny preset of docs/DESIGN.md with deterministic random weights (float32, CPU)."""
    cfg = cfg or tiny_config()
    with torch.device("meta"):
        model = AlpamayoModel(cfg)
    model = model.to_empty(device="cpu").float()
    _restore_computed_buffers(model, torch.device("cpu"))
    init_weights(model, seed)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Write the tiny preset checkpoint.")
    ap.add_argument("--make-tiny", metavar="DIR", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-dir", default=None, help="copy tokenizer files from here")
    args = ap.parse_args(argv)
    out = save_model(create_tiny(args.seed), args.make_tiny, tokenizer_dir=args.tokenizer_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
