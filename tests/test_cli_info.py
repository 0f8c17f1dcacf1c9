"""`moe-runtime info`: the machine, the kernels the engine picks for a model, and the measured CPU plan.

The plan is measured on the tiny model's shapes in bf16 (a fraction of a second), cached in the configured
directory, and read back on the next call: the two calls print the same plan and write one file.
"""

from __future__ import annotations

import json

from moe_runtime.cli import main
from moe_runtime.kernels import cpu


def test_info_prints_the_machine_the_kernels_and_a_cached_plan(tiny_model_dir, tmp_path, capsys):
    plans = tmp_path / "plans"
    argv = ["info", "--model", str(tiny_model_dir), "--set", "model.device=cpu", "--set", "model.dtype=bfloat16",
            "--set", f"engine.cpu_plan_dir={json.dumps(str(plans))}"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "machine: " in first and "torch CPU capability: " in first and "GPU: " in first
    assert "torch.bfloat16" in first and "kernels: attention " in first
    if not cpu.available():  # no native kernels built: the engine has no CPU plan to show
        return
    assert "expert: " in first and "linear " in first
    assert len(list(plans.iterdir())) == 1, "the plan is cached once per machine and model shape"
    assert main(argv) == 0
    assert capsys.readouterr().out == first, "the cached plan reads back as measured"
    assert len(list(plans.iterdir())) == 1


def test_info_names_a_bad_model_path_in_one_line(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing/config.json: not found" in err


def test_info_says_native_decode_off_for_a_family_it_does_not_implement(tmp_path, capsys):
    """The native decode step implements Mixtral's decoder layer only: for Qwen3-MoE `info` must say the
    engine runs it off (what `make_forward` does), not what the kernel choice alone would allow."""
    from moe_runtime.presets.init_model import init_model

    mixtral, qwen = init_model("tiny", tmp_path / "mixtral"), init_model("tiny-qwen3moe", tmp_path / "qwen")
    lines = {}
    for name, model in (("mixtral", mixtral), ("qwen", qwen)):
        assert main(["info", "--model", str(model), "--set", "model.device=cpu", "--set", "model.dtype=bfloat16",
                     "--set", f"engine.cpu_plan_dir={json.dumps(str(tmp_path / 'plans'))}"]) == 0
        lines[name] = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("kernels: "))
    assert lines["qwen"].endswith("native decode steps off")
    if cpu.available():
        assert lines["mixtral"].endswith("native decode steps on")
