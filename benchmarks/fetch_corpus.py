"""Fetch the `python-docs` text corpus of the language-model runs (issue 34) into a data root.

    python benchmarks/fetch_corpus.py --root ~/.cache/tiedmask/data

Gets Debian's python3.11-doc package with `apt-get download` (apt checks it against Debian's
signed package index), unpacks the documentation's reStructuredText sources, one document a
file, into ROOT/python-docs, and checks the text's sha256 against the one this project measured
on (tiedmask.training.corpus.PYTHON_DOCS_DIGESTS); another package version is kept with its own
digest in ROOT/python-docs/fetched.json and said so. The same happens inside any run given
`--data.download true`. Nothing is committed: the corpus stays out of git.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiedmask.errors import ArgumentParser, run_script
from tiedmask.training.corpus import FETCH_RECORD, fetch_python_docs, load_corpus
from tiedmask.training.datasets import default_root


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(default_root()), help="the data root (default: %(default)s)")
    args = parser.parse_args()
    folder = fetch_python_docs(Path(args.root).expanduser())
    record = json.loads((folder / FETCH_RECORD).read_text())
    corpus = load_corpus(folder.name, folder.parent)
    state = "matches the project's" if record["verified"] else "is new to this project (numbers not comparable)"
    print(f"{folder}: {record['package']} {record['version']}, sha256 {record['sha256'][:16]}... {state}; "
          f"documents per split {corpus.sizes()}")


if __name__ == "__main__":
    run_script(main)
