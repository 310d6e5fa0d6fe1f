"""The command line: `resid compare` and `resid info` on a saved checkpoint; `--version`;
`--help` without loading torch."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import resid
from resid.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_compare_prints_a_table_and_exits_0(tiny_dir, capsys):
    assert main(["compare", str(tiny_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for reference in ("transformers (eager)", "transformers (sdpa)", "TransformerLens bridge"):
        line = next(l for l in out.splitlines() if l.startswith(reference))  # noqa: E741
        assert line.endswith("ok") and "100.00%" in line
    assert "hook sites vs TransformerLens (38 shared" in out and "all sites ok" in out


def test_a_difference_beyond_rounding_fails_the_report():
    import torch

    from resid.io.compare import Report, format_report, logit_stats, tolerance

    ref = torch.randn(2, 5, 100, generator=torch.Generator().manual_seed(0)) * 5
    atol, rtol = tolerance(torch.float32)
    close = logit_stats("same", ref, ref + 1e-6, atol, rtol)
    far = logit_stats("off", ref, ref + torch.linspace(0, 1e-2, 100), atol, rtol)
    assert close.ok and close.top1 == 1.0 and abs(close.kl) < 1e-9
    assert not far.ok and abs(far.max_abs - 1e-2) < 1e-6
    report = Report("x", torch.float32, "cpu", 10, "", rows=[close, far])
    assert not report.ok and "BEYOND TOLERANCE" in format_report(report)


def test_compare_bfloat16_within_half_tolerance(tiny_dir, capsys):
    assert main(["compare", str(tiny_dir), "--device", "cpu", "--dtype", "bfloat16"]) == 0


def test_errors_are_one_line_and_exit_2(capsys):
    assert main(["info", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resid info: error: ") and "gpt2-medium" in err


def test_info_and_python_dash_m(tiny_dir):
    out = subprocess.run([sys.executable, "-m", "resid", "info", str(tiny_dir), "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    model = resid.load(tiny_dir, device="cpu")
    names = model.hook_names
    assert f"hook sites: {len(names)}" in out.stdout and len(names) > 30
    per_block = [n.removeprefix("blocks.0.") for n in names if n.startswith("blocks.0.")]
    assert f"blocks.{{l}}.…): {', '.join(per_block)}\n" in out.stdout
    assert per_block[0] == "hook_resid_pre" and "attn.hook_pattern" in per_block
    # one config entry a line, name and value apart (issue 24: `parallel_attn_mlpFalse`)
    config = model.cfg.to_dict()
    lines = [
        line.split()
        for line in out.stdout.splitlines()
        if line.split()[:1] in ([k] for k in config)
    ]
    assert {name: value for name, value in lines} == {k: str(v) for k, v in config.items()}
    assert "parallel_attn_mlp  False" in out.stdout and "n_layers" in config


def test_version_is_the_projects():
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"$', pyproject, re.MULTILINE).group(1)
    out = subprocess.run([sys.executable, "-m", "resid", "--version"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and out.stdout == f"resid {version}\n"


def best_of(argv: list[str], n: int = 5) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True, timeout=120)
        times.append(time.perf_counter() - start)
    return min(times)


def test_help_loads_no_torch_and_is_fast():
    """`resid --help` imports only the standard library's argparse: no torch (which alone
    takes seconds to import). Timed against a bare interpreter on the same machine, so the
    bound holds on a slow or busy one: torch's import is well over 10 of them."""
    probe = ("import sys, resid.cli\ntry:\n    resid.cli.main(['--help'])\nexcept SystemExit:\n"
             "    pass\nprint(sorted(m for m in ('torch', 'numpy', 'plotly') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "[]"
    bare = best_of([sys.executable, "-c", "pass"])
    help_ = best_of([sys.executable, "-m", "resid", "--help"])
    assert help_ < 5 * bare, f"resid --help took {help_:.3f} s, python -c pass {bare:.3f} s"


@pytest.mark.parametrize("argv", [[], ["compare"], ["frobnicate", "x"]])
def test_usage_errors(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
