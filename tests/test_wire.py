"""The byte layout: golden vectors pin it, and malformed headers get specific errors."""
import struct
import zlib

import pytest
import torch

import gradcodec
from gradcodec import wire
from gradcodec.errors import CorruptPayload, LayoutMismatch, PayloadTooLarge, UnknownCodec, UnsupportedVersion

X = torch.tensor([[0.5, -1.0, 2.0], [0.0, 3.25, -0.125]])

# Version-1 payloads. Changing the layout must bump wire.VERSION, not these bytes.
GOLDEN_RAW = bytes.fromhex(
    "474344430100010014000000180000000000000003726177001801000001020203010106000000000000003f000080bf0000004000000000"
    "00005040000000be3a63a077"
)
GOLDEN_INT8_DICT = bytes.fromhex(
    "47434443010000002c00000014000000000000000c696e74383a626c6f636b3d3800140200066c6f72612e41030202030206060101000162"
    "010002060101010014d94e007ffb000047a3d13c7f0000000683413c775f962f"
)
GOLDEN_INT4_ZSTD = bytes.fromhex(
    "474344430100020024000000190000000000000011696e74343a626c6f636b3d387c7a73746400100100017701010a020505010200000000"
    "28b52ffd2010810000316497cafd0000004992243f4992243f8a47ee87"
)


def reseal(blob: bytes | bytearray) -> bytes:
    """Recompute the trailing checksum so a deliberately altered payload reaches the parser."""
    body = bytes(blob[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


def test_raw_encoding_matches_golden_bytes():
    assert gradcodec.encode(X, "raw") == GOLDEN_RAW


def test_int8_dict_encoding_matches_golden_bytes():
    named = {"lora.A": X.to(torch.bfloat16), "b": torch.tensor(1.5)}
    assert gradcodec.encode(named, "int8:block=8") == GOLDEN_INT8_DICT


def test_golden_payloads_decode_to_known_tensors():
    assert torch.equal(gradcodec.decode(GOLDEN_RAW), X)
    named = gradcodec.decode(GOLDEN_INT8_DICT)
    assert list(named) == ["lora.A", "b"] and named["lora.A"].dtype == torch.bfloat16
    assert named["b"].shape == () and named["b"].item() == 1.5  # a lone block's absmax is exact
    w = gradcodec.decode(GOLDEN_INT4_ZSTD)["w"]
    # hand computation: block 1 = [-4.5..2.5], absmax 4.5, scale 4.5/7; block 2 = [3.5, 4.5], same absmax
    scale = torch.tensor(4.5, dtype=torch.float32) / 7
    expected_codes = torch.floor((torch.arange(10.0) - 4.5) * (7 / torch.tensor(4.5)) + 0.5)
    assert torch.equal(w, expected_codes * scale)


def test_raw_golden_layout_fields():
    magic, version, flags, head_len, stored = wire.PRELUDE.unpack_from(GOLDEN_RAW, 0)
    assert (magic, version, flags) == (b"GCDC", 1, wire.FLAG_SINGLE)
    assert stored == 24 and len(GOLDEN_RAW) == wire.PRELUDE.size + head_len + stored + 4
    assert GOLDEN_RAW[-28:-4] == X.numpy().tobytes()


def test_every_section_starts_8_byte_aligned():
    named = {"a": torch.randn(3), "b": torch.randn(5, dtype=torch.float16), "c": torch.randn(1)}
    blob = gradcodec.encode(named, "raw")
    h = wire.read_header(blob)
    pos = h.payload_offset
    for _, _, _, infos in h.tensors:
        for s in infos:
            assert pos % 8 == 0
            pos += s.nbytes + (-s.nbytes % 8)


def test_flipped_payload_bit_fails_checksum():
    blob = bytearray(GOLDEN_RAW)
    blob[-10] ^= 0x01
    with pytest.raises(CorruptPayload, match="checksum"):
        gradcodec.decode(bytes(blob))


@pytest.mark.parametrize("cut", [0, 1, 4, 19, 20, 40, len(GOLDEN_RAW) - 5, len(GOLDEN_RAW) - 1])
def test_truncated_payload_is_corrupt(cut):
    with pytest.raises(CorruptPayload):
        gradcodec.decode(GOLDEN_RAW[:cut])


def test_trailing_garbage_is_corrupt():
    with pytest.raises(CorruptPayload, match="length"):
        gradcodec.decode(GOLDEN_RAW + b"\0")


def test_wrong_magic_is_corrupt():
    with pytest.raises(CorruptPayload, match="magic"):
        gradcodec.decode(reseal(b"XXXX" + GOLDEN_RAW[4:]))


def test_newer_version_is_unsupported():
    blob = bytearray(GOLDEN_RAW)
    struct.pack_into("<H", blob, 4, wire.VERSION + 1)
    with pytest.raises(UnsupportedVersion, match="upgrade"):
        gradcodec.decode(reseal(blob))


def test_unknown_flag_is_corrupt():
    blob = bytearray(GOLDEN_RAW)
    struct.pack_into("<H", blob, 6, 0x80)
    with pytest.raises(CorruptPayload, match="flag"):
        gradcodec.decode(reseal(blob))


def test_non_bytes_input_is_corrupt():
    with pytest.raises(CorruptPayload):
        gradcodec.decode("not bytes")  # type: ignore[arg-type]


def _raw_payload_with_shape(shape: tuple[int, ...]) -> bytes:
    """A hand-built raw payload whose header declares `shape` but carries a 4-byte section."""
    msg = wire.Message("raw", [wire.TensorEntry("t", torch.float32, shape, [torch.zeros(1)])])
    return wire.pack(msg)


def test_huge_declared_shape_is_refused_before_allocating():
    with pytest.raises(PayloadTooLarge, match="max_output_bytes"):
        gradcodec.decode(_raw_payload_with_shape((1 << 40,)))


def test_declared_shape_disagreeing_with_section_is_corrupt():
    with pytest.raises(CorruptPayload, match="raw section"):
        gradcodec.decode(_raw_payload_with_shape((3,)))


def test_max_output_bytes_lowers_the_limit():
    blob = gradcodec.encode(torch.zeros(1000), "raw")
    with pytest.raises(PayloadTooLarge):
        gradcodec.decode(blob, max_output_bytes=3999)
    assert gradcodec.decode(blob, max_output_bytes=4000).shape == (1000,)


def test_unknown_codec_in_payload():
    msg = wire.Message("nosuchcodec", [wire.TensorEntry("t", torch.float32, (1,), [torch.zeros(1)])])
    with pytest.raises(UnknownCodec, match="nosuchcodec"):
        gradcodec.decode(wire.pack(msg))


def test_invalid_spec_in_payload_is_corrupt():
    msg = wire.Message("int8:block=7", [wire.TensorEntry("t", torch.float32, (1,), [torch.zeros(1)])])
    with pytest.raises(CorruptPayload, match="block"):
        gradcodec.decode(wire.pack(msg))


def test_section_table_disagreeing_with_payload_length_is_corrupt():
    blob = bytearray(GOLDEN_RAW)
    h = wire.read_header(GOLDEN_RAW)
    raw_len_at = wire.PRELUDE.size + 1 + len(h.codec) + 1 + len(h.fingerprint)  # one-byte varints here
    assert blob[raw_len_at] == h.raw_payload_len == 24
    blob[raw_len_at] = 32
    with pytest.raises(CorruptPayload, match="section table"):
        gradcodec.decode(reseal(blob))


def test_zstd_frame_that_lies_about_its_size_is_corrupt():
    import zstandard

    region = b"\1" * 64
    frame = zstandard.ZstdCompressor().compress(region)
    msg = wire.Message("raw|zstd", [wire.TensorEntry("t", torch.uint8, (64,), [torch.ones(64, dtype=torch.uint8)])])
    good = wire.pack(msg, compress=lambda buffers, total, places: [frame])
    assert torch.equal(gradcodec.decode(good)["t"], torch.ones(64, dtype=torch.uint8))
    bad = wire.pack(msg, compress=lambda buffers, total, places: [zstandard.ZstdCompressor().compress(region + b"\1")])
    with pytest.raises(CorruptPayload, match="zstd"):
        gradcodec.decode(bad)


def test_nonzero_padding_is_corrupt():
    blob = bytearray(GOLDEN_INT8_DICT)
    h = wire.read_header(GOLDEN_INT8_DICT)
    first = h.tensors[0][3][0]  # 6 int8 codes, followed by 2 bytes of padding
    blob[h.payload_offset + first.nbytes] = 1
    with pytest.raises(CorruptPayload, match="padding"):
        gradcodec.decode(reseal(blob))


def test_repeated_tensor_name_is_corrupt():
    entry = wire.TensorEntry("t", torch.float32, (1,), [torch.zeros(1)])
    with pytest.raises(CorruptPayload, match="repeats"):
        gradcodec.decode(wire.pack(wire.Message("raw", [entry, entry])))


def test_names_are_front_coded():
    names = [f"model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in range(3) for ab in "AB"]
    blob = gradcodec.encode({n: torch.zeros(1) for n in names}, "raw")
    assert list(gradcodec.decode(blob)) == names
    assert len(blob) < 20 + len(names[0]) + 5 * 20 + 6 * 20 + 6 * 8  # far below six full names


def test_front_coding_cannot_expand_names_without_bound():
    # one real name, then many entries that each repeat all of it with a 2-byte prefix code
    long_name = "x" * 60000
    entries = [wire.TensorEntry(long_name + str(i), torch.float32, (0,), []) for i in range(200)]
    blob = wire.pack(wire.Message("raw", entries))
    with pytest.raises(CorruptPayload, match="names decode to more"):
        wire.read_header(blob)


def test_overlong_varint_is_corrupt():
    blob = bytearray(GOLDEN_RAW)
    spec_len_at = wire.PRELUDE.size
    blob[spec_len_at] = 0x83  # continuation bit on the spec length: the varint now runs into the spec
    with pytest.raises(CorruptPayload):
        gradcodec.decode(reseal(blob))


# ------------------------------------------------------------------ layout by reference (version 2)

LORA = {"layers.0.q_proj.lora_A": torch.arange(32.0).reshape(4, 8), "layers.0.q_proj.lora_B": torch.ones(8, 4)}


@pytest.mark.parametrize("spec", ["raw", "int8", "topk:ratio=0.25|int4|zstd", "powersgd:rank=1|fp16"])
def test_by_reference_payload_decodes_like_the_self_describing_one(spec):
    full = gradcodec.encode(LORA, spec, seed=3)
    ref = gradcodec.encode(LORA, spec, seed=3, by_reference=True)
    assert len(ref) < len(full)
    a, b = gradcodec.decode(full), gradcodec.decode(ref, layout=LORA)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert gradcodec.decode(ref, layout=gradcodec.Layout.of(LORA)).keys() == LORA.keys()


def test_by_reference_header_drops_exactly_the_table():
    """Names, dtypes and shapes leave the header; an 8-byte fingerprint comes in."""
    # hand-counted rows: A = prefix 0, length 22, 22 name bytes, dtype, ndim, 2 dims = 28 bytes;
    # B = prefix 21, length 1, "B", dtype, ndim, 2 dims = 7 bytes; by reference: an 8-byte fingerprint
    saved = 28 + 7 - 8
    full, ref = gradcodec.encode(LORA, "raw"), gradcodec.encode(LORA, "raw", by_reference=True)
    h_full, h_ref = wire.read_header(full), wire.read_header(ref, layout=wire.Layout.of(LORA))
    assert abs((h_full.payload_offset - h_ref.payload_offset) - saved) < wire.ALIGN  # up to the header's padding
    assert (h_full.version, h_ref.version) == (1, 2) and h_ref.by_reference and not h_full.by_reference


def test_by_reference_single_tensor_round_trips():
    t = torch.randn(33)
    out = gradcodec.decode(gradcodec.encode(t, "fp16", by_reference=True), layout=t)
    assert isinstance(out, torch.Tensor) and out.shape == (33,)


@pytest.mark.parametrize("change", ["missing", "renamed", "reshaped", "dtype", "reordered", "extra"])
def test_by_reference_payload_refuses_a_wrong_layout(change):
    blob = gradcodec.encode(LORA, "int8", by_reference=True)
    a, b = LORA.items()
    wrong = {
        "missing": None,
        "renamed": {a[0] + "x": a[1], b[0]: b[1]},
        "reshaped": {a[0]: a[1].reshape(8, 4), b[0]: b[1]},
        "dtype": {a[0]: a[1].half(), b[0]: b[1]},
        "reordered": {b[0]: b[1], a[0]: a[1]},
        "extra": {**LORA, "c": torch.ones(1)},
    }[change]
    with pytest.raises(LayoutMismatch, match="layout"):
        gradcodec.decode(blob, layout=wrong)
    with pytest.raises(LayoutMismatch):
        gradcodec.inspect(blob, layout=wrong)


def test_by_reference_flag_in_a_version_1_payload_is_corrupt():
    blob = bytearray(gradcodec.encode(LORA, "raw", by_reference=True))
    struct.pack_into("<H", blob, 4, 1)
    with pytest.raises(CorruptPayload, match="version 1"):
        gradcodec.decode(reseal(blob), layout=LORA)


def test_layout_fingerprint_is_pinned():
    """The fingerprint is part of the wire format: SHA-256 of the self-describing table, 8 bytes."""
    assert wire.Layout.of(LORA).fingerprint.hex() == "443ce9d873d702d4"
