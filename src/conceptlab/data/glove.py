"""GloVe word vectors from their text format (``word v1 v2 ...`` per line), for LaViSE's real path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def load_glove(path: str | Path, words: set[str]) -> dict[str, np.ndarray]:
    """Vectors of ``words`` from a GloVe-format text file (read line by line: the 6B file is ~1 GB)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No GloVe vectors at {path}: pass embedding='glove:<path to vectors.txt>'.")
    found: dict[str, np.ndarray] = {}
    with open(path, encoding="utf8") as f:
        for line_no, line in enumerate(f, 1):
            word, _, rest = line.rstrip().partition(" ")
            if word in words:
                try:
                    found[word] = np.array(rest.split(), dtype=np.float32)
                except ValueError as err:
                    raise ValueError(f"{path}:{line_no} is not 'word number number ...' (GloVe format).") from err
    dims = {v.shape[0] for v in found.values()}
    if len(dims) > 1:
        raise ValueError(f"{path} has vectors of different lengths {sorted(dims)}.")
    return found


def glove_embeddings(names: Sequence[str], path: str | Path) -> tuple[torch.Tensor, np.ndarray]:
    """``(vectors, keep)``: L2-normalised GloVe embeddings of the names where ``keep`` is true.

    A name is lower-cased (as GloVe is) and split into words ("traffic light", "t-shirt"), and
    its embedding is the mean of its words' vectors; a word missing from the file is dropped,
    and a name with no word left is dropped, with a note that counts both.
    """
    tokens = [n.lower().replace("-", " ").split() for n in names]
    vectors = load_glove(path, {w for t in tokens for w in t})
    missing = sorted({w for t in tokens for w in t} - set(vectors))
    keep = np.array([any(w in vectors for w in t) for t in tokens])
    if missing:
        print(
            f"note: the GloVe file lacks {len(missing)} word(s) ({', '.join(missing[:8])}"
            f"{', ...' if len(missing) > 8 else ''}): dropped {int((~keep).sum())} of {len(names)} concepts "
            "with no word left; the others average the words it has."
        )
    if not keep.any():
        raise ValueError(f"The GloVe file {path} has a vector for none of the {len(names)} concepts.")
    rows = [np.mean([vectors[w] for w in t if w in vectors], 0) for t, k in zip(tokens, keep) if k]
    return F.normalize(torch.from_numpy(np.stack(rows)), dim=-1), keep


__all__ = ["glove_embeddings", "load_glove"]
