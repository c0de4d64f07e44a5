"""PDFs built in the test: pages drawn with PIL and written by PIL's PDF writer, and a
password-protected one written by hand with the standard security handler (RC4, 40 bits,
revision 2: PDF 1.7 section 7.6.3), since neither PIL nor pypdfium2 writes encryption."""

import hashlib
import io

from PIL import Image, ImageDraw

PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def pages_pdf(sizes, seed: int = 0) -> bytes:
    """A PDF whose pages are (width, height) points, each a different drawing."""
    pages = []
    for i, (w, h) in enumerate(sizes):
        im = Image.new("RGB", (w, h), (250, 250, 245))
        draw = ImageDraw.Draw(im)
        for k in range(6):
            x, y = (
                (37 * (i + k + seed)) % max(w - 20, 1),
                (23 * (2 * i + k + seed)) % max(h - 20, 1),
            )
            draw.rectangle([x, y, x + 15, y + 9], fill=(40 * k % 255, 90 * i % 255, 160))
        draw.text((4, 4), f"page {i + 1}", fill=(0, 0, 0))
        pages.append(im)
    buf = io.BytesIO()
    pages[0].save(buf, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    return buf.getvalue()


def _rc4(key: bytes, data: bytes) -> bytes:
    s = list(range(256))
    j = 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(byte ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


def _padded(password: bytes) -> bytes:
    return (password + PAD)[:32]


def encrypted_pdf(user_password: bytes = b"secret", owner_password: bytes = b"owner") -> bytes:
    """A one-page (200 x 100 points, no content) PDF that opens only with `user_password`."""
    doc_id = hashlib.md5(b"mlx-glm4v test").digest()
    permissions = -4
    owner = _rc4(hashlib.md5(_padded(owner_password)).digest()[:5], _padded(user_password))
    key = hashlib.md5(
        _padded(user_password) + owner + permissions.to_bytes(4, "little", signed=True) + doc_id
    ).digest()[:5]
    user = _rc4(key, PAD)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] /Resources << >> >>",
        b"<< /Filter /Standard /V 1 /R 2 /Length 40 /O <%s> /U <%s> /P %d >>"
        % (owner.hex().encode(), user.hex().encode(), permissions),
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (n, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Encrypt 4 0 R /ID [<%s> <%s>] >>\n" % (
        len(objects) + 1,
        doc_id.hex().encode(),
        doc_id.hex().encode(),
    )
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)
