"""The strict GGUF reader (edgeadapt/formats/gguf_file.py) against gguf's own reader, and its refusals on the
parts the delta-file fixtures do not reach: arrays stepped over, big-endian files, alignment."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from edgeadapt.errors import FormatError, UnsupportedError
from edgeadapt.formats.gguf_file import open_gguf, parse_gguf

N_VOCAB = 3000


def _write(path, *, alignment=None):
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_token_list([f"tok{i}".encode() for i in range(N_VOCAB)])
    w.add_token_scores([float(i) for i in range(N_VOCAB)])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_string("test.text", "héllo")
    w.add_bool("test.flag", True)
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((3, 32)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((5, 64)).astype(np.float16))
    q = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64])
def test_matches_gguf_reader(tmp_path, alignment):
    p = _write(tmp_path / "m.gguf", alignment=alignment)
    theirs = gguf.GGUFReader(str(p))
    full, lean = parse_gguf(p.read_bytes(), "m"), open_gguf(p, max_items=100)
    assert lean.alignment == full.alignment == (alignment or 32)
    for k, f in theirs.fields.items():
        if k.startswith("GGUF.") or k == "test.nested":  # gguf's contents() flattens nested arrays
            continue
        assert full.fields[k].contents() == f.contents(), k
        assert len(lean.fields[k].data) == len(full.fields[k].data) == len(f.data), k
        assert lean.fields[k].span == full.fields[k].span, k  # stepping over lands where reading does
    assert lean.fields["tokenizer.ggml.tokens"].contents() is None
    assert lean.fields["tokenizer.ggml.scores"].contents() is None
    assert lean.fields["test.nested"].contents() == [[1, 2], [3]]
    assert lean.tensors == full.tensors
    for a, b in zip(lean.tensors, theirs.tensors):
        assert (a.name, a.ttype, a.shape[::-1], a.start, a.nbytes) == (
            b.name, b.tensor_type, tuple(b.shape), b.data_offset, b.n_bytes)
        assert lean.view(a).dtype == b.data.dtype and np.array_equal(lean.view(a), b.data)
    assert not lean.view(lean.tensors[0]).flags.writeable


def _string_array_length_at(data: bytes, key: str, item: int) -> int:
    """Byte offset of the length of item ``item`` of the string array ``key``."""
    pos = data.index(key.encode()) + len(key) + 4 + 4 + 8  # key, value type, item type, count
    for _ in range(item):
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]
    return pos


def test_arrays_stepped_over_are_still_bounds_checked(tmp_path):
    data = _write(tmp_path / "m.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    lying = bytearray(data)
    at = _string_array_length_at(data, "tokenizer.ggml.tokens", 2500)
    lying[at:at + 8] = struct.pack("<Q", 1 << 50)
    bad.write_bytes(bytes(lying))
    msg = (f"expected {1 << 50} bytes of the value of 'tokenizer.ggml.tokens'[2500] at byte {at + 8}, "
           f"found {len(data) - at - 8} (truncated file or a lying size)")
    for max_items in (None, 100):
        with pytest.raises(FormatError) as e:
            open_gguf(bad, max_items=max_items)
        assert str(e.value) == f"{bad}: {msg}"
    # a cut inside the stepped-over scores array
    cut = _string_array_length_at(data, "tokenizer.ggml.tokens", N_VOCAB) + 100
    bad.write_bytes(data[:cut])
    with pytest.raises(FormatError, match=r"the value of 'tokenizer\.ggml\.scores' claims 3000 items; only \d+ bytes"):
        open_gguf(bad, max_items=100)


def test_versions_and_alignment(tmp_path):
    data = _write(tmp_path / "m.gguf").read_bytes()
    big = bytearray(data)
    big[4:8] = struct.pack(">I", 3)
    with pytest.raises(UnsupportedError, match=r"m: GGUF version 50331648, a big-endian file \(version 3\); "
                                               r"this reader takes little-endian versions 2 and 3"):
        parse_gguf(bytes(big), "m")
    v9 = bytearray(data)
    v9[4:8] = struct.pack("<I", 9)
    with pytest.raises(UnsupportedError, match="GGUF version 9, an unknown version"):
        parse_gguf(bytes(v9), "m")
    v2 = bytearray(data)
    v2[4:8] = struct.pack("<I", 2)
    assert parse_gguf(bytes(v2), "m").version == 2
    odd = bytearray(_write(tmp_path / "a.gguf", alignment=64).read_bytes())
    key = b"general.alignment"
    at = odd.index(key) + len(key) + 4
    odd[at:at + 4] = struct.pack("<I", 48)
    with pytest.raises(FormatError, match="general.alignment must be a uint32 power of two up to 65536, found UINT32 48"):
        parse_gguf(bytes(odd), "a")
    with pytest.raises(FormatError, match="empty.gguf: expected 4 bytes of the GGUF magic at byte 0, found 0"):
        (tmp_path / "empty.gguf").write_bytes(b"")
        open_gguf(tmp_path / "empty.gguf")
    with pytest.raises(FormatError, match="nothing.gguf is not a readable GGUF file: FileNotFoundError"):
        open_gguf(tmp_path / "nothing.gguf")
