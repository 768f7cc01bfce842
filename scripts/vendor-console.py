#!/usr/bin/env python3
"""Re-fetch the console's vendored front-end files from the npm registry and compare them with the copies in
src/r1serve/static/vendor (or, with --update, replace them and rewrite the record).

Development-time only: r1serve's install and run never need node. The record, static/vendor/VENDOR.json,
pins each package's version, the registry's tarball integrity (sha512) and every shipped file's sha256, so
that a reviewer can check that the files are the published ones, unmodified.

    python scripts/vendor-console.py            # compare (exit 1 on any difference)
    python scripts/vendor-console.py --update   # fetch the pinned versions again and write them
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VENDOR = Path(__file__).resolve().parent.parent / "src" / "r1serve" / "static" / "vendor"
RECORD = VENDOR / "VENDOR.json"

# package -> (version, {file in the tarball's package/ -> name shipped here}). Only what the pages load,
# plus the licence; no source maps.
PACKAGES: dict[str, tuple[str, dict[str, str]]] = {
    "swagger-ui-dist": (
        "5.35.0",
        {
            "swagger-ui-bundle.js": "swagger-ui-bundle.js",
            "swagger-ui.css": "swagger-ui.css",
            "LICENSE": "swagger-ui-LICENSE.txt",
        },
    ),
    # The playground's answers: markdown (marked), sanitised (DOMPurify), code highlighted (highlight.js).
    "marked": ("18.2.1", {"lib/marked.umd.js": "marked.umd.js", "LICENSE": "marked-LICENSE.txt"}),
    "dompurify": ("3.5.0", {"dist/purify.min.js": "purify.min.js", "LICENSE": "dompurify-LICENSE.txt"}),
    "@highlightjs/cdn-assets": (
        "11.12.0",
        {
            "highlight.min.js": "highlight.min.js",
            "styles/github.min.css": "highlight-github.min.css",
            "styles/github-dark.min.css": "highlight-github-dark.min.css",
            "LICENSE": "highlight-LICENSE.txt",
        },
    ),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(name: str, version: str, workdir: Path) -> tuple[Path, str]:
    """The package's tarball (npm pack) and the registry's integrity string for it, checked."""
    out = subprocess.run(
        ["npm", "pack", f"{name}@{version}", "--json", "--pack-destination", str(workdir)],
        check=True, capture_output=True, text=True, cwd=workdir,
    ).stdout  # fmt: skip
    info = json.loads(out)[0]
    tarball = workdir / info["filename"]
    integrity = info["integrity"]
    algo, _, digest = integrity.partition("-")
    actual = base64.b64encode(hashlib.new(algo, tarball.read_bytes()).digest()).decode()
    if actual != digest:
        raise SystemExit(f"{name}@{version}: tarball does not match the registry's integrity {integrity}")
    return tarball, integrity


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="write the fetched files and the record")
    args = parser.parse_args()
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    new_record: dict[str, object] = {}
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (version, files) in PACKAGES.items():
            tarball, integrity = fetch(name, version, Path(tmp))
            shipped: dict[str, str] = {}
            with tarfile.open(tarball) as tar:
                for inner, local in files.items():
                    member = tar.extractfile(f"package/{inner}")
                    assert member is not None, inner
                    data = member.read()
                    shipped[local] = sha256(data)
                    target = VENDOR / local
                    if args.update:
                        VENDOR.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(data)
                    elif not target.exists():
                        problems.append(f"{local}: missing")
                    elif sha256(target.read_bytes()) != shipped[local]:
                        problems.append(f"{local}: differs from {name}@{version}")
            new_record[name] = {"version": version, "integrity": integrity, "files": shipped}
            if not args.update and record.get(name) != new_record[name]:
                problems.append(f"{name}: VENDOR.json does not match the registry's {name}@{version}")
    if args.update:
        RECORD.write_text(json.dumps(new_record, indent=2) + "\n")
        print(f"wrote {RECORD}")
        return 0
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print("vendored files match the registry")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
