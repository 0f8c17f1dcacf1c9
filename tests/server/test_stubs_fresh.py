"""The committed stubs in moe_runtime/v1/ are what `make proto` generates from proto/ now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_stubs_match_proto(tmp_path):
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto/moe_runtime/v1").glob("*.proto"))
    assert protos, "no .proto files under proto/moe_runtime/v1"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "proto", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos], cwd=ROOT, check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated
    stale = [str(p) for p in generated if (tmp_path / p).read_bytes() != (ROOT / p).read_bytes()]
    assert not stale, f"stale generated stubs {stale}: run `make proto` and commit moe_runtime/v1/"
