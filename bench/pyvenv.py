"""The virtual environment a reference benchmark runs in, created on first use."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def ensure_venv(name, packages, note, script):
    """Re-runs `script` inside bench/`name`, creating it and installing `packages` from PyPI on
    first use (`note` says what to expect of the install)."""
    venv = os.path.join(HERE, name)
    py = os.path.join(venv, "bin", "python")
    if os.path.realpath(sys.prefix) == os.path.realpath(venv):
        return
    marker = os.path.join(venv, ".needle-ready")
    if not os.path.exists(marker):
        if not os.path.exists(py):
            print(f"creating {venv}", file=sys.stderr)
            subprocess.check_call([sys.executable, "-m", "venv", venv])
        print("installing " + ", ".join(packages) + f" ({note})", file=sys.stderr)
        subprocess.check_call([py, "-m", "pip", "install", "--quiet"] + packages)
        open(marker, "w").close()
    os.execv(py, [py, os.path.abspath(script)] + sys.argv[1:])
