"""Text corpora for language-model runs: a folder of UTF-8 documents, split by document.

A corpus is a folder `<data root>/<name>/` of `*.txt` files, one document each (any folder of
text works: `--data.name my-notes` reads `<root>/my-notes/*.txt`). Documents, never windows,
are split into train / validation / test, by a hash of the file name: a document's split does
not depend on which other documents the folder holds, and no test text leaks into training.

`python-docs` is the corpus the project benchmarks on: the reStructuredText sources of the
Python 3.11 documentation (about 500 documents, 11 MB of English prose and code), as Debian's
`python3.11-doc` package ships them. `fetch_python_docs` gets the package with `apt-get download`
(apt checks it against Debian's signed index), unpacks the sources and checks the text against
the checksum below.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, TiedmaskError
from ..files import atomic_write_json, writable_folder

PYTHON_DOCS = "python-docs"
PYTHON_DOCS_PACKAGE = "python3.11-doc"
# sha256 of the corpus text (see `corpus_digest`) per package version; another version still
# works, its digest is recorded with every run, but its numbers are not comparable to ours.
PYTHON_DOCS_DIGESTS = {
    "3.11.2-6+deb12u9": "76c498cc3543b4f7f6eb0f3cbffd19463b67711c51beeef3e88a13a841edeca5",
}
SPLITS = ("train", "val", "test")
HELD_OUT_PERCENT = 5  # of documents each for validation and test
FETCH_RECORD = "fetched.json"  # which package version the folder came from, and its digest


@dataclass
class Corpus:
    name: str
    documents: dict[str, list[str]]  # split -> document texts, in file-name order
    digest: str  # sha256 of every document's name and text

    def sizes(self) -> dict[str, int]:
        return {split: len(docs) for split, docs in self.documents.items()}


def split_of(name: str) -> str:
    """The split of a document, from its file name alone."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100
    if bucket < HELD_OUT_PERCENT:
        return "test"
    return "val" if bucket < 2 * HELD_OUT_PERCENT else "train"


def corpus_digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def load_corpus(name: str, root: Path, download: bool = False) -> Corpus:
    folder = Path(root) / name
    if not folder.is_dir() and download and name == PYTHON_DOCS:
        fetch_python_docs(Path(root))
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not files:
        fix = (f"fetch it with `--data.download true` (or `python benchmarks/fetch_corpus.py --root {root}`)"
               if name == PYTHON_DOCS else f"put the documents there as {folder}/*.txt, one file each")
        raise ConfigError(f"text corpus {name!r}: no documents in {folder}; {fix}")
    documents: dict[str, list[str]] = {split: [] for split in SPLITS}
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TiedmaskError(f"cannot read document {path} as UTF-8 text ({exc.__class__.__name__}); "
                                "convert or remove it") from None
        documents[split_of(path.name)].append(text)
    empty = [s for s in SPLITS if not documents[s]]
    if empty:
        raise ConfigError(f"text corpus {folder} has {len(files)} documents, none of them in the "
                          f"{'/'.join(empty)} split; a corpus needs about 40 documents or more "
                          "(documents are split 90/5/5 by file name)")
    return Corpus(name, documents, corpus_digest(files))


# ---------------------------------------------------------------- fetching python-docs

def fetch_python_docs(root: Path, version: str = "") -> Path:
    """Download and unpack the Python documentation's sources into `root/python-docs`."""
    writable_folder(root, "choose a writable --data.root")
    dest = root / PYTHON_DOCS
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise TiedmaskError(f"fetching {PYTHON_DOCS} needs Debian's apt-get and dpkg-deb; on another system "
                            f"put any folder of .txt documents at {dest}")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        package = PYTHON_DOCS_PACKAGE + (f"={version}" if version else "")
        got = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if got.returncode or not debs:
            last = (got.stderr.strip().splitlines() or ["no package"])[-1]
            raise TiedmaskError(f"apt-get download {package} failed ({last}); run `apt-get update` first")
        unpacked = Path(tmp) / "x"
        unpacking = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], capture_output=True, text=True)
        if unpacking.returncode:
            raise TiedmaskError(f"dpkg-deb cannot unpack {debs[0].name} ({unpacking.stderr.strip()[:120]}); "
                                "fetch it again")
        sources = next(unpacked.glob("usr/share/doc/python3*/html/_sources"), None)
        if sources is None:
            raise TiedmaskError(f"{debs[0].name} holds no documentation sources; fetch another version")
        staging = Path(tmp) / PYTHON_DOCS
        staging.mkdir()
        for path in sorted(sources.rglob("*.rst.txt")):
            flat = str(path.relative_to(sources)).removesuffix(".rst.txt").replace("/", "__")
            shutil.copyfile(path, staging / f"{flat}.txt")
        found_version = debs[0].name.split("_")[1].replace("%2b", "+")
        digest = corpus_digest(list(staging.glob("*.txt")))
        expected = PYTHON_DOCS_DIGESTS.get(found_version)
        if expected and expected != digest:
            raise TiedmaskError(f"{PYTHON_DOCS} {found_version}: the text's sha256 is {digest}, expected "
                                f"{expected}; the download is damaged: fetch again")
        atomic_write_json(staging / FETCH_RECORD,
                          {"package": PYTHON_DOCS_PACKAGE, "version": found_version, "sha256": digest,
                           "verified": bool(expected)})
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    return dest

