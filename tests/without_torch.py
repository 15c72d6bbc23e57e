"""`infini-trt ARGS` in a Python where torch and onnxscript (the `export` extra) cannot be
imported, as in an install without them: python tests/without_torch.py run EXPORT_DIR ...
(`runpy.run_path(this, run_name="x")["block"]()` blocks them in the calling process.)"""
import sys

BLOCKED = ("torch", "onnxscript")


class _Missing:
    """A finder ahead of every other that says these packages are not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def block() -> None:
    sys.meta_path.insert(0, _Missing())
    for name in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
        del sys.modules[name]


if __name__ == "__main__":
    block()
    from infini_trt.runtime.cli import main

    sys.argv = ["infini-trt", *sys.argv[1:]]
    main()
