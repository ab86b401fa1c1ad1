"""Build a chapter's expensive artifacts outside its notebook, e.g. data-parallel under ``accelerate``.

    accelerate launch --num_processes 2 -m conceptlab.prepare 04_ex2 -f params.yml
    papermill notebooks/04_ex2.ipynb out.ipynb -f params.yml     # loads what prepare built
    accelerate launch --num_processes 2 -m conceptlab.prepare 04_ex2 06_lavise -f both.yml

``params.yml`` holds the chapter's papermill parameters; relative paths in it resolve against
``notebooks/``, as they do when papermill runs there. Every process validates the parameters and
builds the stages before training into the shared artifact store (one builds, the others wait);
the training that ``accelerate`` spreads over the processes (EX2's GRPO, LaViSE's CNN) is then stored
by the main process, and the notebook, run with the same parameters, finds every artifact built.
A chapter takes part by giving its module (:mod:`conceptlab.chapters`) a ``prepare(ch)`` function.
Several chapters in one launch pay the start-up (imports, process group) once; each takes the names
of the file it declares (:func:`chapter_parameters`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from .bookrun import NOTEBOOKS

# Chapters with a data-parallel training: EX2's GRPO (trl) and LaViSE's world CNN (each process takes
# its share of every batch). DEAL's loop also runs under accelerate, but each process computes the
# whole batch (L_spa sums over it), so several processes are no faster and DEAL is not listed.
PREPARED = ("04_ex2", "06_lavise")


def prepare(chapter: str, params: dict) -> None:
    """Validate ``params`` and build the chapter's artifacts: ``chapters.load(chapter).prepare(ch)``."""
    from . import chapters

    chapters.load(chapter).prepare(chapters.start(chapter, params))


def chapter_parameters(names: list[str], params: dict) -> dict[str, dict]:
    """Each chapter's share of one parameter file. One chapter gets the whole file (and rejects a name it
    does not declare); several get the names each declares, as a book file's ``common`` block gives
    them, and a name that none of them declares is an error."""
    if len(names) == 1:
        return {names[0]: params}
    from . import chapters

    declared = {name: set(chapters.spec(name)) for name in names}
    unused = sorted(set(params) - set().union(*declared.values()))
    if unused:
        raise ValueError(f"none of the chapters {names} declares {unused}: remove them from the file")
    return {name: {k: v for k, v in params.items() if k in declared[name]} for name in names}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("chapter", nargs="+", choices=PREPARED, help="the chapters whose artifacts to build, in turn")
    ap.add_argument("-f", "--parameters", type=Path, default=None, help="a YAML file of papermill parameters")
    args = ap.parse_args(argv)
    params: dict = {}
    if args.parameters is not None:
        params = yaml.safe_load(args.parameters.read_text()) or {}
        if not isinstance(params, dict):
            ap.error(f"{args.parameters} must hold a mapping of parameter names to values")
    try:
        shares = chapter_parameters(args.chapter, params)
    except ValueError as err:
        ap.error(f"{args.parameters}: {err}")
    os.chdir(NOTEBOOKS)  # relative paths mean what they mean in the notebook
    for chapter, share in shares.items():
        prepare(chapter, share)
        # torchrun and accelerate launch set RANK and WORLD_SIZE: one line per process says who took part
        print(f"{chapter} prepared: process {os.environ.get('RANK', '0')} of {os.environ.get('WORLD_SIZE', '1')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
