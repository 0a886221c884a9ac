"""Lower-priority file quirks (issue #29, item 7): a UTF-8 byte-order mark before a first-line
FINDINGS header, a PNG whose image data stops after half its rows (PIL zero-fills it without a
word), and a header announcing a decompression bomb (PIL's error names no file)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cxr_relink.datamodules.datamodule import load_image
from cxr_relink.datamodules.mimic_cxr import MimicCXRReader
from cxr_relink.datamodules.reader_utils import DataError, verify_image
from cxr_relink.datamodules.report_sections import parse_report
from tests.test_readers import by_id, make_mimic

BOM = "\ufeff"
REPORT = "FINDINGS: The lungs are clear. No effusion.\n\nIMPRESSION: No acute process.\n"


def test_bom_before_a_first_line_header_keeps_the_section(tmp_path):
    ref = parse_report(REPORT)  # the same text without the mark
    got = parse_report(BOM + REPORT)
    assert ref.findings == "The lungs are clear. No effusion." and ref.impression == "No acute process."
    assert (got.findings, got.impression, got.used_fallback) == (ref.findings, ref.impression, False)
    # the reader: a report file saved with a BOM (Windows editors) reads as the same report
    root = make_mimic(tmp_path, gz=False)
    rep = root / "files/p10/p10000935/s51178377.txt"
    rep.write_bytes(BOM.encode() + REPORT.encode())
    st = by_id(MimicCXRReader(root=str(root)).load())["51178377"]
    assert st.findings == ref.findings and st.impression == ref.impression and not st.report.startswith(BOM)
    # a BOM before a CSV header (a spreadsheet's "CSV UTF-8") does not hide the first column
    split = root / "mimic-cxr-2.0.0-split.csv"
    split.write_bytes(BOM.encode() + split.read_bytes())
    assert len(MimicCXRReader(root=str(root)).load()) == 4


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, raw: bytes, color_type: int = 0, bits: int = 8, interlace: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bits, color_type, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


def test_png_holding_half_its_rows_fails_verify(tmp_path):
    a = np.random.default_rng(0).integers(1, 255, (64, 48), dtype=np.uint8)
    rows = [b"\x00" + a[r].tobytes() for r in range(64)]  # filter byte 0 + the row
    whole, half = tmp_path / "whole.png", tmp_path / "half.png"
    whole.write_bytes(_png(48, 64, b"".join(rows)))
    half.write_bytes(_png(48, 64, b"".join(rows[:32])))  # a complete zlib stream of 32 rows, then IEND
    with Image.open(half) as im:  # the independent reference: PIL decodes it, the lower half zeros
        im.load()
        assert (np.asarray(im)[32:] == 0).all() and (np.asarray(im)[:32] == a[:32]).all()
    assert verify_image(str(whole)) is None
    with Image.open(whole) as im:
        assert (np.asarray(im) == a).all()
    why = verify_image(str(half))
    assert why is not None and "32 of 64 rows" in why
    # Pillow's own writer: grey, RGB and 16-bit layouts pass
    for mode, arr in (("L", a), ("RGB", np.stack([a, a, a], -1)), ("I;16", a.astype(np.uint16) * 257)):
        p = tmp_path / f"ok_{mode.replace(';', '')}.png"
        Image.fromarray(arr, mode=mode if mode != "I;16" else None).save(p)
        assert verify_image(str(p)) is None, mode
    # interlaced (Adam7): the seven passes' rows, whole and cut short
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    adam7 = [b"\x00" + a[y, x0::dx].tobytes() for x0, y0, dx, dy in passes for y in range(y0, 64, dy)]
    inter, inter_cut = tmp_path / "adam7.png", tmp_path / "adam7_cut.png"
    inter.write_bytes(_png(48, 64, b"".join(adam7), interlace=1))
    inter_cut.write_bytes(_png(48, 64, b"".join(adam7[: len(adam7) - 10]), interlace=1))
    with Image.open(inter) as im:
        assert (np.asarray(im) == a).all()  # PIL reads the hand-made interlaced file as the image
    assert verify_image(str(inter)) is None and "interlaced" in verify_image(str(inter_cut))
    rgb_half = tmp_path / "rgb_half.png"
    rgb_half.write_bytes(_png(48, 64, b"".join(b"\x00" + np.repeat(a[r], 3).tobytes() for r in range(40)), 2))
    assert "rows" in verify_image(str(rgb_half))


def test_decompression_bomb_header_names_the_file(tmp_path):
    big = tmp_path / "huge.png"
    big.write_bytes(_png(20000, 20000, b"\x00" * 10))  # 400 Mpx announced
    why = verify_image(str(big))  # before: PIL's DecompressionBombError escaped, naming no file
    assert why is not None and "400000000 pixels" in why
    with pytest.raises(ValueError, match=r"item 3: image file .*huge\.png: .*400000000 pixels"):
        load_image(str(big), "item 3")
    root = make_mimic(tmp_path / "m", gz=False)
    img = root / "files/p10/p10000935/s51178377/d6.jpg"
    img.write_bytes(big.read_bytes())
    with pytest.raises(DataError, match=r"d6\.jpg: .*400000000 pixels"):
        MimicCXRReader(root=str(root), check_images="verify").load()
