"""Cut what follows an image's own end: a file that is a 512x512 JPEG plus 200 MB of junk must not
travel (and be copied into every shard) as 200 MB. Pure functions over the container formats'
structure; anything not understood is returned unchanged (filter decides whether it decodes)."""

from __future__ import annotations

import struct


def trim_trailing(data: bytes) -> bytes:
    """`data` up to the end of the image it starts with (JPEG, PNG, GIF, WebP), else unchanged."""
    try:
        if data[:3] == b"\xff\xd8\xff":
            end = _jpeg_end(data)
        elif data[:8] == b"\x89PNG\r\n\x1a\n":
            end = _png_end(data)
        elif data[:6] in (b"GIF87a", b"GIF89a"):
            end = _gif_end(data)
        elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            end = 8 + struct.unpack("<I", data[4:8])[0]
            end += end % 2  # RIFF pads to an even size
        else:
            return data
    except (IndexError, struct.error, ValueError):
        return data
    return data[:end] if end and 0 < end < len(data) else data


def _jpeg_end(data: bytes) -> int:
    """Offset after the EOI marker: walk the segments to the scan, then the entropy-coded data
    (where 0xFF is followed by 0x00 or a restart marker) to the first real marker; repeat for
    progressive JPEGs' further scans."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return 0
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # EOI
            return i + 2
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        i += 2 + length
        if marker == 0xDA:  # start of scan: skip the entropy-coded segment
            while True:
                j = data.find(b"\xff", i)
                if j < 0 or j + 1 >= n:
                    return 0
                nxt = data[j + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
                    i = j + (1 if nxt == 0xFF else 2)
                    continue
                i = j
                break
    return 0


def _png_end(data: bytes) -> int:
    i = 8
    while i + 8 <= len(data):
        length = struct.unpack(">I", data[i : i + 4])[0]
        kind = data[i + 4 : i + 8]
        i += 12 + length
        if kind == b"IEND":
            return i
    return 0


def _gif_end(data: bytes) -> int:
    flags = data[10]
    i = 13 + (3 * (2 << (flags & 7)) if flags & 0x80 else 0)
    n = len(data)
    while i < n:
        block = data[i]
        if block == 0x3B:  # trailer
            return i + 1
        if block == 0x21:  # extension: label, then sub-blocks
            i += 2
        elif block == 0x2C:  # image descriptor, local colour table, LZW code size, sub-blocks
            lflags = data[i + 9]
            i += 10 + (3 * (2 << (lflags & 7)) if lflags & 0x80 else 0) + 1
        else:
            return 0
        while i < n and data[i]:
            i += data[i] + 1
        i += 1
    return 0
