"""Rebuild the registry's ``sal-detectron2`` snapshot as a pure-Python ``detectron2`` wheel.

The snapshot is upstream Detectron2's Python code (Aug 2024) tagged cp310 and shipping a ``_C``
binary compiled for another torch. We drop the binary, rename the distribution to ``detectron2``
and retag it ``py3-none-any`` (see shared/SETUP_NOTES.md). Usage: ``rebuild_d2_wheel.py IN OUT``.
"""

import base64
import hashlib
import re
import sys
import zipfile


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def rebuild(src: str, dst: str) -> None:
    out_files = {}
    with zipfile.ZipFile(src) as zin:
        for info in zin.infolist():
            name = info.filename
            if re.match(r"detectron2/_C.*\.(so|pyd)$", name):
                continue
            data = zin.read(name)
            dist_info = re.match(r"sal_detectron2-([^/]+)\.dist-info/(.*)", name)
            if dist_info:
                version, leaf = dist_info.groups()
                name = f"detectron2-{version}.dist-info/{leaf}"
                if leaf == "METADATA":
                    data = re.sub(rb"^Name: .*$", b"Name: detectron2", data, count=1, flags=re.M)
                    # the code runs under NumPy 2; the snapshot's metadata pin is stale
                    data = re.sub(rb"^Requires-Dist: numpy<2\r?\n", b"", data, flags=re.M)
                elif leaf == "WHEEL":
                    data = re.sub(rb"^Tag: .*$", b"Tag: py3-none-any", data, flags=re.M)
                    data = data.replace(b"Root-Is-Purelib: false", b"Root-Is-Purelib: true")
                elif leaf == "RECORD":
                    continue
            out_files[name] = data
    record_name = next(n for n in out_files if n.endswith(".dist-info/METADATA")).replace(
        "METADATA", "RECORD"
    )
    lines = [_record_line(n, d) for n, d in out_files.items()] + [f"{record_name},,"]
    out_files[record_name] = ("\n".join(lines) + "\n").encode()
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for name, data in out_files.items():
            zout.writestr(name, data)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: rebuild_d2_wheel.py SRC_WHEEL DST_WHEEL")
    rebuild(sys.argv[1], sys.argv[2])
