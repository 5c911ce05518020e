# SPDX-License-Identifier: Apache-2.0
"""The SPDX license line every source file carries: lists the files without it (--check), or
adds it (the default) as the first line, after a shebang or encoding line if there is one.

  python tools/spdx_headers.py [--check] [FILE ...]   (default: every source file in the
                                                      repository's packed_kernels, csrc,
                                                      tests, bench, python, tools, and its
                                                      top-level .py files)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

LICENSE = "Apache-2.0"
ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("packed_kernels", "csrc", "tests", "bench", "python", "tools")
COMMENT = {".py": "#", ".cu": "//", ".cuh": "//", ".h": "//", ".cpp": "//"}


def header(path: Path) -> str:
    return f"{COMMENT[path.suffix]} SPDX-License-Identifier: {LICENSE}\n"


def source_files(root: Path = ROOT) -> list:
    files = [p for p in root.glob("*.py")]  # setup.py, conftest.py
    for folder in FOLDERS:
        files += [p for p in (root / folder).rglob("*")
                  if p.suffix in COMMENT and p.is_file() and "__pycache__" not in p.parts]
    return sorted(files)


def has_header(text: str) -> bool:
    return any("SPDX-License-Identifier:" in line for line in text.splitlines()[:3])


def with_header(path: Path, text: str) -> str:
    """`text` with the SPDX line first (after a shebang / coding line)."""
    lines = text.splitlines(keepends=True)
    at = 0
    while at < len(lines) and at < 2 and (lines[at].startswith("#!") or "coding" in lines[at]
                                         and lines[at].startswith("#")):
        at += 1
    return "".join(lines[:at]) + header(path) + "".join(lines[at:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="list files without it; exit 1 if any")
    parser.add_argument("files", nargs="*", type=Path)
    args = parser.parse_args(argv)
    files = args.files or source_files()
    missing = [p for p in files if not has_header(p.read_text())]
    for path in missing:
        if args.check:
            print(path)
        else:
            path.write_text(with_header(path, path.read_text()))
    return 1 if args.check and missing else 0


if __name__ == "__main__":
    sys.exit(main())
