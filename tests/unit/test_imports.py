"""The `pacs-ai serve` parent process (listener, assembly, pipeline slots, outbox, console)
and every CLI command run without torch: only the spawned scoring child
(:mod:`pacs_ai.scoring_worker`) loads models. Each case imports in a fresh interpreter and
asserts ``torch`` never got imported; on failure the import chain (the pacs_ai frames of the
stack that first asked for torch) is printed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Records who imports torch first, then runs the case's code and prints one JSON line.
PROBE = textwrap.dedent(
    """
    import importlib.abc, json, sys, traceback

    chain = []

    class Recorder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision") and not chain:
                chain.extend(
                    f"{f.filename}:{f.lineno} {f.line}"
                    for f in traceback.extract_stack()[:-1]
                    if "importlib" not in f.filename
                )
            return None

    sys.meta_path.insert(0, Recorder())
    try:
    {code}
    except SystemExit:
        pass
    print(json.dumps({
        "torch": "torch" in sys.modules,
        "torchvision": "torchvision" in sys.modules,
        "chain": chain,
    }))
    """
)

PARENT_SIDE = {
    "service": "import pacs_ai.service",
    "pipeline": "import pacs_ai.pipeline, pacs_ai.results, pacs_ai.scoring_worker",
    "scoring module": "import pacs_ai.scoring",
    "startup and monitoring": "import pacs_ai.startup, pacs_ai.monitoring",
    "web console": "import pacs_ai.web, pacs_ai.web.app, pacs_ai.web.server",
    "cli parser": "from pacs_ai.cli import build_parser; build_parser()",
    "cli audit --help": (
        "import contextlib, io\n"
        "from pacs_ai.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['audit', 'studies', '--help'])"
    ),
    "model card and specs": (
        "from pacs_ai.inference import ModelCard, bundled_model_dir, load_card\n"
        "from pacs_ai.imaging.spec import InputSpec\n"
        "from pacs_ai.inference.ood_spec import DEFAULT_QUANTILE, OodSpec\n"
        "card = load_card(bundled_model_dir('cxr'))\n"
        "assert isinstance(card.input, InputSpec) and isinstance(card, ModelCard)"
    ),
}


def _probe(code: str) -> dict[str, object]:
    script = PROBE.replace("{code}", textwrap.indent(code, "    " * 2))
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    result: dict[str, object] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("code", PARENT_SIDE.values(), ids=PARENT_SIDE.keys())
def test_parent_side_imports_no_torch(code: str) -> None:
    result = _probe(code)
    chain = result["chain"]
    assert isinstance(chain, list)
    chain_text = "\n".join(str(line) for line in chain)
    assert (result["torch"], result["torchvision"]) == (False, False), (
        f"torch imported; first import chain:\n{chain_text}"
    )


def test_probe_sees_torch_when_the_runner_is_used() -> None:
    """The detector works: the lazily resolved names of pacs_ai.inference do import torch,
    and the chain names the lazy resolution and the runner."""
    result = _probe("from pacs_ai.inference import load_model, LoadedModel")
    assert result["torch"] is True
    chain = result["chain"]
    assert isinstance(chain, list)
    files = [line.split(":")[0] for line in chain]
    assert str(ROOT / "pacs_ai" / "inference" / "__init__.py") in files
    assert str(ROOT / "pacs_ai" / "inference" / "runner.py") in files


def test_lazy_names_are_the_runner_objects() -> None:
    import pacs_ai.inference as inference
    from pacs_ai.inference import runner

    assert inference.load_model is runner.load_model
    assert inference.LoadedModel is runner.LoadedModel
    assert inference.SeriesScore is runner.SeriesScore
    assert inference.select_device is runner.select_device
    assert set(inference.__all__) <= set(dir(inference))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        _ = inference.no_such_name
