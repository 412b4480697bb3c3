"""Importing the package and building the ``local`` model never imports Transformer Engine.

A fresh interpreter installs a ``sys.meta_path`` finder that records every attempt to import
``transformer_engine*`` (with the stack) and refuses it.  Megatron-Core itself probes for TE in
``try: import transformer_engine`` blocks while we import it; those probes are expected and
harmless.  What must never happen is an import statement *in joyai_megatron* reaching for TE: the
frame that issues each recorded import must not be one of ours, and TE must not end up loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.joyai_helpers import REPO, scrubbed_env

PROBE = r"""
import json, sys, traceback

attempts = []

class RefuseTransformerEngine:
    def find_spec(self, name, path=None, target=None):
        if name == "transformer_engine" or name.startswith("transformer_engine."):
            stack = [(f.filename, f.lineno) for f in traceback.extract_stack()[:-1]]
            attempts.append({"name": name, "stack": stack})
            raise ModuleNotFoundError(f"blocked by the test: {name}", name=name)
        return None

sys.meta_path.insert(0, RefuseTransformerEngine())

import joyai_megatron
import joyai_megatron.cli
import joyai_megatron.training.trainer
import joyai_megatron.stages.pretrain
import joyai_megatron.training.plan
from megatron.core import parallel_state
from joyai_megatron.config.schema import ModelCfg, ParallelCfg, PrecisionCfg
from joyai_megatron.model.build import build_joyai_model
from joyai_megatron.model.config import build_transformer_config
from joyai_megatron.model.presets import TINY
from joyai_megatron.training.distributed import init_distributed, shutdown

init_distributed()
parallel_state.initialize_model_parallel()
config = build_transformer_config(TINY, ModelCfg(backend="local", mtp_enabled=True), ParallelCfg(), PrecisionCfg())
model = build_joyai_model(config, TINY, "local")
n_params = sum(p.numel() for p in model.parameters())
shutdown()
print("RESULT " + json.dumps({
    "attempts": attempts,
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] == "transformer_engine"),
    "n_params": n_params,
}))
"""


def _importer(stack: list[list]) -> str:
    """The file whose code issued the import: the innermost frame outside the import machinery."""
    for filename, _line in reversed(stack):
        if "importlib" not in filename and not filename.startswith("<frozen"):
            return filename
    return "<none>"


def test_local_model_never_imports_transformer_engine() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env=scrubbed_env(PYTHONWARNINGS="ignore"), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["n_params"] > 0
    assert result["loaded"] == [], result["loaded"]
    package = str(REPO / "joyai_megatron")
    ours = [a for a in result["attempts"] if _importer(a["stack"]).startswith(package)]
    assert not ours, "joyai_megatron imports Transformer Engine:\n" + "\n".join(
        f"{a['name']} from {_importer(a['stack'])}" for a in ours
    )
    # The finder really was consulted (Megatron probes for TE): the check above is not vacuous.
    assert result["attempts"], "no transformer_engine import was attempted at all"
    assert all(_importer(a["stack"]).find("megatron") >= 0 for a in result["attempts"])
