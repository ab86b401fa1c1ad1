"""The README's real-path command lines: one per chapter, naming only parameters the chapter declares,
and one of them run end to end on stand-in files (a tiny CUB folder, a tiny checkpoint, descriptors)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from papermill.cli import _resolve_type  # papermill's own reading of `-p name value`
from PIL import Image

from conceptlab.bookrun import ROOT, chapters, declared_parameters, run_chapter, smoke_parameters
from conceptlab.chapter import ParameterError, validate
from conceptlab.chapters import spec
from conceptlab.models import load_clip

SECTION = "### Real-path command lines, chapter by chapter"


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION) :]
    return section[: section.index("\n## ")]


def readme_commands() -> list[tuple[str, dict]]:
    """``(chapter, parameters)`` of every papermill command in the README's real-path section."""
    section = readme_section()
    lines = "\n".join(re.findall(r"```bash\n(.*?)```", section, flags=re.S)).replace("\\\n", " ")
    out = []
    for line in lines.splitlines():
        if line.strip().startswith("papermill "):
            argv = shlex.split(line)
            assert len(argv) >= 3 and argv[1].endswith(".ipynb"), f"not a papermill command: {line}"
            params, rest = {}, argv[3:]
            while rest:
                flag, *rest = rest
                if flag == "-p":
                    (name, value), rest = rest[:2], rest[2:]
                    params[name] = _resolve_type(value)
                elif flag == "-y":
                    params.update(yaml.safe_load(rest.pop(0)))
                else:
                    raise AssertionError(f"unexpected {flag!r} in: {line}")
            out.append((argv[1].removesuffix(".ipynb"), params))
    return out


COMMANDS = readme_commands()


def test_every_chapter_has_a_real_path_command_or_says_why_not():
    world_only = set(re.findall(r"`(\d\d_\w+)\.ipynb` has no real path", readme_section()))
    with_command = {c for c, _ in COMMANDS}
    assert with_command | world_only == set(chapters()) and not with_command & world_only


@pytest.mark.parametrize("chapter, params", COMMANDS, ids=[f"{c}-{i}" for i, (c, _) in enumerate(COMMANDS)])
def test_command_names_only_declared_parameters(chapter, params):
    unknown = set(params) - declared_parameters(chapter)
    assert not unknown, f"the README passes {sorted(unknown)} to {chapter}, which does not declare them"
    assert "..." not in json.dumps(params), "a command a user copies must be complete"
    assert params.get("model", "world") != "world" or "target_model" in params, "not a real-path command"


@pytest.mark.parametrize("chapter, params", COMMANDS, ids=[f"{c}-{i}" for i, (c, _) in enumerate(COMMANDS)])
def test_command_values_have_the_declared_types(chapter, params):
    declared = spec(chapter)
    params = {k: v for k, v in params.items() if k in declared}  # names are checked by the test above
    try:
        validate(params, declared)  # the user's files are absent here, so no check reaches a file or a network
    except ParameterError as err:
        absent = r"no such (file|folder)|does not exist"  # the README's /data/... files
        problems = [line for line in str(err).splitlines()[1:] if not re.search(absent, line)]
        assert not problems, f"{chapter}: {problems}"


def _tiny_cub(root: Path, folders: list[str]) -> Path:
    rows: dict[str, list[str]] = {
        "images.txt": [],
        "image_class_labels.txt": [],
        "train_test_split.txt": [],
        "classes.txt": [],
    }
    for c, folder in enumerate(folders, start=1):
        rows["classes.txt"].append(f"{c} {folder}")
        for j in range(4):
            i = 4 * c + j
            (root / "images" / folder).mkdir(parents=True, exist_ok=True)
            colour = tuple(int(v) for v in torch.randint(0, 255, (3,)))
            Image.new("RGB", (90 + 10 * j, 70), colour).save(root / "images" / folder / f"{j}.jpg")
            rows["images.txt"].append(f"{i} {folder}/{j}.jpg")
            rows["image_class_labels.txt"].append(f"{i} {c}")
            rows["train_test_split.txt"].append(f"{i} {int(j < 2)}")
    for name, lines in rows.items():
        (root / name).write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.notebook
def test_descriptors_command_runs_on_stand_in_files(tmp_path, kernel):
    chapter = "02_descriptors"
    params = next(p for c, p in COMMANDS if c == chapter)
    ckpt = tmp_path / "clip.pt"
    torch.save({"state_dict": load_clip("ConceptWorld-ViT", None, "cpu")[0].state_dict()}, ckpt)
    folders = ["001.Black_footed_Albatross", "009.Brewer_Blackbird", "101.Chuck_will_Widow"]
    cub = _tiny_cub(tmp_path / "CUB_200_2011", folders)
    descriptors = tmp_path / "descriptors.json"
    descriptors.write_text(
        json.dumps(
            {
                name: [f"{name} feature {k}" for k in range(6)]
                for name in ("Black-footed Albatross", "Brewer's Blackbird", "Chuck-will's-widow")
            }
        )
    )
    stand_in = {"pretrained": str(ckpt), "data_root": str(cub), "descriptors": str(descriptors)}
    assert set(stand_in) <= set(params) and params["dataset"] == "cub"
    run = {**smoke_parameters(chapter, tmp_path), **params, **stand_in, "model": "ConceptWorld-ViT"}
    executed = run_chapter(chapter, tmp_path / "executed", run, kernel)
    cells = json.loads(executed.read_text())["cells"]
    outputs = [o for c in cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join("".join(o.get("text", "")) for o in outputs)
    assert "3 of 3 classes matched (3 after normalising" in text
    assert (tmp_path / "results" / f"{chapter}.json").exists()
