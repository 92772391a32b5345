"""Real test files of every format, made here: a hand-written PDF, a python-docx document, a zip bomb."""

from __future__ import annotations

import io
import zipfile


def make_pdf(pages: list[str], title: str = "") -> bytes:
    """A valid PDF with one text line per page (Helvetica), correct xref offsets."""
    objs: list[bytes] = []
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
    objs.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for i, text in enumerate(pages):
        lines = text.split("\n")
        ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
        for ln in lines:
            esc = ln.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops.append(f"({esc}) Tj T*")
        ops.append("ET")
        stream = "\n".join(ops).encode()
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                    f"/Contents {5 + 2 * i} 0 R >>".encode())
        objs.append(b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream")
    info = len(objs) + 1
    objs.append(f"<< /Title ({title}) >>".encode())
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objs, 1):
        offsets.append(out.tell())
        out.write(f"{n} 0 obj\n".encode() + body + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode())
    for off in offsets:
        out.write(f"{off:010d} 00000 n \n".encode())
    out.write(f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R /Info {info} 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()


def make_docx() -> bytes:
    import docx

    d = docx.Document()
    d.core_properties.title = "Travel policy"
    d.add_heading("Travel policy", level=1)
    d.add_paragraph("Employees book economy class for flights under six hours.")
    d.add_heading("Approvals", level=2)
    d.add_paragraph("Trips abroad need approval from a director.", style="List Bullet")
    d.add_paragraph("Conference fees are paid by the team budget.", style="List Bullet")
    t = d.add_table(rows=2, cols=2)
    t.cell(0, 0).text, t.cell(0, 1).text = "City", "Daily allowance"
    t.cell(1, 0).text, t.cell(1, 1).text = "Zurich", "120 CHF"
    buf = io.BytesIO()
    d.save(buf)
    return buf.getvalue()


def make_zip_bomb(expanded: int = 64 * 1024 * 1024) -> bytes:
    """A 'docx' whose word/document.xml inflates from ~64 KiB to `expanded` bytes of zeros."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("[Content_Types].xml", "<Types/>")
        with zf.open("word/document.xml", "w", force_zip64=True) as fh:
            block = b"\0" * (1 << 20)
            for _ in range(expanded // len(block)):
                fh.write(block)
    return buf.getvalue()


HTML = b"""<!doctype html><html><head><title>Onboarding</title><style>p{color:red}</style></head>
<body><nav>Home | About</nav><h1>Onboarding</h1><p>Welcome to the <b>company</b>.</p>
<h2>First week</h2><ul><li>Meet your buddy</li><li>Set up your laptop</li></ul>
<table><tr><th>Day</th><th>Task</th></tr><tr><td>Monday</td><td>Security training</td></tr></table>
<script>var secret = "do not index";</script><pre>make up\nmake test</pre></body></html>"""

MD = b"""# Handbook

Intro paragraph about the handbook and what it covers for all new staff.

## Holidays

Staff get 25 days of paid holiday per year, plus public holidays.

```
# not a heading inside a code fence
```

## Expenses

- Keep receipts
- Submit within 30 days

| item | limit |
|------|-------|
| meal | 40 EUR |
"""

RST = b"""==========
Operations
==========

Operations run the on-call rotation for the platform and its databases.

On-call
=======

The on-call engineer answers pages within fifteen minutes, day or night.

Escalation
----------

Escalate to the incident commander when customers are affected.
"""

CSV = b"name,team,office\nAda Lovelace,research,London\nGrace Hopper,compilers,Arlington\n"
JSON = b'{"title": "Service catalog", "services": [{"name": "billing", "owner": "payments", "tier": 1}, ' \
       b'{"name": "search", "owner": "knowledge", "tier": 2}], "updated": "2024-05-01"}'
