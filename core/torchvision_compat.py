"""Make `import torchvision` work on a CPU-only torch when torchvision's C extension cannot load.

Why: the only torchvision served for torch 2.13 (0.28.0) is a CUDA build. On a CPU torch its
`_C.so` does not load, and `torchvision/_meta_registrations.py` then fails at import with
`operator torchvision::nms does not exist` because it registers fake kernels for `nms`/`qnms`
without checking that the ops exist. That breaks `open_clip`, `timm` and diffusers' models.

What: before torchvision is imported, try to load its extension; only if that fails, define the
schemas of `torchvision::nms` and `torchvision::qnms` (the two ops registered unconditionally),
without kernels. Nothing else changes: torchvision's compiled ops (`nms`, `roi_align`, ...) stay
unavailable and say so when called; this project never uses them.

How it is wired: `scripts/setup.sh` runs `python -m core.torchvision_compat install`, which writes a
one-line `.pth` file plus a copy of this module into the venv's site-packages so every process of
the venv (Ray and Beam workers included) gets the hook. Library code that needs torchvision also
calls `ensure_torchvision_importable()` directly, so a plain `pip install` works too.
"""

from __future__ import annotations

import importlib.abc
import os
import shutil
import sys
import sysconfig

_PTH_NAME = "webpairs_torchvision_compat.pth"
_MODULE_NAME = "webpairs_torchvision_compat"
_patched = False


def _torchvision_extension_path() -> str | None:
    """Path of torchvision's `_C` extension without importing torchvision."""
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    for name in os.listdir(folder):
        if name.startswith("_C.") and name.endswith((".so", ".pyd")):
            return os.path.join(folder, name)
    return None


def ensure_torchvision_importable() -> bool:
    """Define the missing torchvision op schemas if its extension cannot load; True if patched."""
    global _patched
    if _patched:
        return True
    import torch

    path = _torchvision_extension_path()
    if path is None:
        return False  # torchvision not installed: nothing to do
    try:
        torch.ops.load_library(path)
        return False  # the real extension works: leave everything alone
    except (OSError, RuntimeError, ImportError):
        pass
    if hasattr(torch.ops.torchvision, "nms"):
        _patched = True
        return True
    lib = torch.library.Library("torchvision", "DEF")  # noqa: kept alive below
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    ensure_torchvision_importable._lib = lib  # a Library object unregisters when collected
    _patched = True
    return True


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Runs the patch once, right before the first `import torchvision`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            try:
                ensure_torchvision_importable()
            except Exception:  # never break an import because of the hook itself
                pass
        return None


def install_finder() -> None:
    """Register the lazy import hook (called from the .pth file at interpreter start)."""
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


def install_into_site_packages() -> str:
    """Copy this module and a .pth that activates it into the current environment."""
    site = sysconfig.get_paths()["purelib"]
    shutil.copyfile(__file__, os.path.join(site, _MODULE_NAME + ".py"))
    with open(os.path.join(site, _PTH_NAME), "w") as fh:
        fh.write(f"import {_MODULE_NAME}; {_MODULE_NAME}.install_finder()\n")
    return site


def _main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "check"
    if cmd == "install":
        site = install_into_site_packages()
        print(f"torchvision compat hook installed in {site}")
        return 0
    if cmd == "check":
        import torchvision  # noqa: F401  (the .pth hook must make this work)
        import open_clip  # noqa: F401

        print(f"torchvision {torchvision.__version__} and open_clip import fine")
        return 0
    print("usage: python -m core.torchvision_compat install|check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
