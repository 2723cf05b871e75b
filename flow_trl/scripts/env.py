"""`flow-trl env`: the platform, Python, library versions and device, to paste into a bug report."""

from __future__ import annotations

import argparse
import platform
from importlib.metadata import PackageNotFoundError, version

from .. import __version__


LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "trl", "datasets")


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _device() -> str:
    """The accelerator torch sees: CUDA with each GPU's name, MPS, or CPU."""
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"cuda ({torch.cuda.device_count()}x: {', '.join(names)})"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def environment() -> dict[str, str]:
    """`{name: value}` of what `flow-trl env` prints."""
    info = {
        "Platform": platform.platform(),
        "Python version": platform.python_version(),
        "flow_trl version": __version__,
    }
    info.update({f"{name} version": _version(name) for name in LIBRARIES})
    info["Device"] = _device() if info["torch version"] != "not installed" else "unknown (no torch)"
    return info


def cli(argv: list[str] | None = None, prog: str = "flow-trl env") -> dict[str, str]:
    argparse.ArgumentParser(prog=prog, description=__doc__).parse_args(argv)
    info = environment()
    print("\nCopy-paste the following information when reporting an issue:\n")
    print("\n".join(f"- {key}: {value}" for key, value in info.items()))
    return info


if __name__ == "__main__":
    cli()
