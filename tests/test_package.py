"""Package-level behaviour: lazy imports (torch loads only on first use) and the console script's OpenMP setting."""

from __future__ import annotations

import os
import subprocess
import sys


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    full.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_importing_the_package_does_not_load_torch_until_a_name_is_used():
    out = _run("import sys, magic_pl, magic_pl.zoo, magic_pl.zoo.study\n"
               "assert 'torch' not in sys.modules, 'torch loaded on import'\n"
               "from magic_pl import merge, CalibrationSetting\n"
               "assert 'torch' in sys.modules and callable(merge)\n"
               "print(sorted(magic_pl.__all__) == magic_pl.__all__)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_console_script_sets_passive_openmp_before_torch_unless_the_user_chose():
    code = ("import os, sys\nsys.argv = ['magic-pl', '--help']\nfrom magic_pl._entry import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint('policy=' + os.environ['OMP_WAIT_POLICY'])")
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert "calibrate" in out.stdout and out.stdout.strip().endswith("policy=PASSIVE")
    out = _run(code, {"OMP_WAIT_POLICY": "ACTIVE"})
    assert out.stdout.strip().endswith("policy=ACTIVE")
