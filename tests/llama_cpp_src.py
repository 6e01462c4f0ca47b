"""llama.cpp's source tree for the tests that run its own tools (convert_hf_to_gguf.py, convert_lora_to_gguf.py)
or read its vocabulary files (models/ggml-vocab-*.gguf): $LLAMA_CPP_DIR when set, else the vendor/llama.cpp
folder of the installed llama-cpp-python's source release, fetched once from PyPI with pip (pip caches it) and
unpacked under ~/.cache/edgeadapt. None when neither can be had; the caller skips and says why."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

WHY = ("llama.cpp's source tree not found: set LLAMA_CPP_DIR to a llama.cpp checkout, or install llama-cpp-python "
       "and let the tests fetch its source release with pip")


@functools.cache
def llama_cpp_dir() -> Path | None:
    env = os.environ.get("LLAMA_CPP_DIR")
    if env:
        return Path(env) if (Path(env) / "convert_hf_to_gguf.py").is_file() else None
    try:
        from importlib.metadata import PackageNotFoundError, version

        ver = version("llama-cpp-python")
    except PackageNotFoundError:
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeadapt" / f"llama-cpp-python-{ver}"
    tree = cache / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                              "-d", tmp, f"llama-cpp-python=={ver}"], capture_output=True, text=True, timeout=600)
        sdists = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if got.returncode or not sdists:
            return None
        part = cache.with_name(cache.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        with tarfile.open(sdists[0]) as tar:
            top = tar.getnames()[0].split("/")[0]
            tar.extractall(part, filter="data")
        shutil.rmtree(cache, ignore_errors=True)
        (part / top).rename(cache)
        shutil.rmtree(part, ignore_errors=True)
    return tree if (tree / "convert_hf_to_gguf.py").is_file() else None
