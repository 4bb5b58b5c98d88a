"""Static files compressed once, at collectstatic, instead of by nginx on every request.

nginx's `gzip_static on` (services/nginx/templates/app.conf.j2, /static/) sends FILE.gz
when it exists and the client accepts gzip: gzipping the admin's 22 KB CSS per request
took nginx's whole 0.5 core (docs/performance.md). collectstatic writes FILE.gz beside
every text file it collected (original and hashed names), at gzip level 9, only where it
is smaller. Debian's nginx has no brotli module, so no .br files.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

from django.contrib.staticfiles.storage import ManifestStaticFilesStorage

COMPRESSIBLE = {".css", ".js", ".mjs", ".map", ".svg", ".txt", ".json", ".html", ".xml",
                ".ico", ".ttf", ".otf", ".eot"}  # fmt: skip
MIN_SIZE = 256  # nginx's gzip_min_length: smaller files are not worth it


def gzip_tree(root: Path) -> list[Path]:
    """Write FILE.gz beside each compressible FILE under root that lacks a current one;
    the .gz files written. Deterministic (no name, mtime 0) and atomic (rename)."""
    written = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in COMPRESSIBLE or not path.is_file():
            continue
        target = path.with_name(path.name + ".gz")
        stat = path.stat()
        if stat.st_size < MIN_SIZE:
            continue
        if target.exists() and target.stat().st_mtime >= stat.st_mtime:
            continue
        data = path.read_bytes()
        packed = gzip.compress(data, compresslevel=9, mtime=0)
        if len(packed) >= len(data):
            continue
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(packed)
        tmp.chmod(0o644)
        tmp.replace(target)
        written.append(target)
    return written


class GzipManifestStaticFilesStorage(ManifestStaticFilesStorage):
    """ManifestStaticFilesStorage, plus FILE.gz beside each text file once all is hashed."""

    def post_process(self, paths, dry_run=False, **options):
        yield from super().post_process(paths, dry_run=dry_run, **options)
        if not dry_run:
            gzip_tree(Path(self.location))
