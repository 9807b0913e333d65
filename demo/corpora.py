"""Long public-domain English text that a machine without the Hugging Face Hub can get.

Jane Austen's six novels ship in Debian's ``r-cran-janeaustenr`` (MIT; the novels are in
the public domain) as an R lazy-load database: ``Rdata.rdx`` is a gzip-compressed R
serialization of an index ``{variables: {name: (offset, length)}}`` into ``Rdata.rdb``,
whose entries are a 4-byte length followed by a zlib-compressed R serialization of a
character vector (one element per line of the book). The ``rdata`` package reads R
serializations; the ``.deb`` is fetched with ``apt-get download`` (no R, no install)
and unpacked with ``dpkg-deb -x``. Novels are cached as UTF-8 text files.
"""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

from longlora_plugin.cache import default_cache_dir

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_NOVELS = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)
_DATA_DIR = Path("usr/lib/R/site-library/janeaustenr/data")


def austen_novels(cache_dir: Path | None = None, deb: Path | None = None) -> dict[str, Path]:
    """Paths of the six novels as text files (``{name: path}``, names as in
    :data:`AUSTEN_NOVELS`), extracting them from ``deb`` or a freshly downloaded
    ``r-cran-janeaustenr`` package on first use. Raises ``RuntimeError`` saying what
    to do when the package cannot be had."""
    target = (cache_dir or default_cache_dir()) / "austen"
    paths = {name: target / f"{name}.txt" for name in AUSTEN_NOVELS}
    if all(p.is_file() for p in paths.values()):
        return paths
    with tempfile.TemporaryDirectory() as tmp:
        package = deb or _download_deb(AUSTEN_PACKAGE, Path(tmp))
        unpacked = Path(tmp) / "unpacked"
        subprocess.run(["dpkg-deb", "-x", str(package), str(unpacked)], check=True)
        books = read_r_lazyload(unpacked / _DATA_DIR / "Rdata")
    target.mkdir(parents=True, exist_ok=True)
    for name, path in paths.items():
        path.write_text("\n".join(books[name]) + "\n", encoding="utf-8")
    return paths


def read_r_lazyload(stem: Path) -> dict[str, list[str]]:
    """Every character-vector object of an R lazy-load database (``stem.rdx`` + ``stem.rdb``)."""
    import rdata

    def parse(raw: bytes):
        return rdata.conversion.convert(rdata.parser.parse_data(raw, expand_altrep=True))

    index = parse(gzip.decompress(stem.with_suffix(".rdx").read_bytes()))
    blob = stem.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        entry = blob[int(offset) : int(offset) + int(length)]
        (size,) = struct.unpack(">I", entry[:4])
        raw = zlib.decompress(entry[4:])
        if len(raw) != size:
            raise ValueError(
                f"{stem}.rdb: entry {name!r} is {len(raw)} bytes, its header says {size}"
            )
        objects[str(name)] = [str(line) for line in parse(raw)]
    return objects


def _download_deb(package: str, directory: Path) -> Path:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(
            f"fetching {package} needs apt-get and dpkg-deb (Debian/Ubuntu); pass a .deb instead"
        )
    for attempt in range(2):
        done = subprocess.run(
            ["apt-get", "download", package],
            cwd=directory,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode == 0:
            return next(directory.glob(f"{package}_*.deb"))
        if attempt == 0:  # a new machine has no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
    raise RuntimeError(f"apt-get download {package} failed: {done.stderr.strip()}")
