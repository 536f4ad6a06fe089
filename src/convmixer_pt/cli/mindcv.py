"""Run a MindCV script with ConvMixer in MindCV's model registry, as if `python SCRIPT ARGS` had been run.

    convmixer-mindcv train.py -c configs/mindcv/convmixer_1024_20.yaml --data_dir /path/to/imagenet
    convmixer-mindcv validate.py -c configs/mindcv/convmixer_768_32.yaml --data_dir imagenet --ckpt_path w.ckpt
    convmixer-mindcv -m some.module ARGS         (a script run with `python -m`)
    mpirun -n 8 convmixer-mindcv train.py -c CONFIG --data_dir /path/to/imagenet --distribute True
    msrun --worker_num 8 --local_worker_num 8 python -m convmixer_pt.cli.mindcv train.py -c CONFIG ...

SCRIPT is MindCV's `train.py`, `validate.py` or `infer.py` (from a checkout of MindCV; they import its
`config.py` from their own folder), or any script that calls `mindcv.create_model`. The script runs as
`__main__` with `sys.argv` = [SCRIPT, ARGS...] and its folder first on `sys.path`; its exit status is this
command's. Before it runs, `convmixer_pt.mindcv` registers convmixer_768_32, convmixer_1024_20 and
convmixer_1536_20. Needs MindSpore and MindCV 0.3.0 or newer (the `mindspore` extra).
"""

from __future__ import annotations

import argparse
import gc
import runpy
import sys
from pathlib import Path

from ..errors import UserError
from ..runtime import require_mindcv
from .common import Parser, run


def parser() -> Parser:
    summary, details = __doc__.split("\n\n", 1)
    p = Parser(prog="convmixer-mindcv", description=summary, epilog=details,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("script", metavar="SCRIPT", help="the Python script to run (or -m MODULE, as with python)")
    p.add_argument("args", nargs=argparse.REMAINDER,
                   help="the script's own arguments, passed on unchanged (options included)")
    return p


def run_script(script: str | None, module: str | None, args: list[str]) -> int:
    """Register ConvMixer in MindCV, then run `script` (or `module`) with `args` as `python` would; returns its
    exit status."""
    if module is None:
        path = Path(script)
        if not path.is_file():
            raise UserError(f"{script}: no such script" if not path.exists() else f"{script}: not a file")
    require_mindcv(f"running {script or module} with ConvMixer")
    from .. import mindcv  # noqa: F401  (registers ConvMixer in MindCV's registry)

    saved_argv, saved_path = sys.argv[:], sys.path[:]
    try:
        if module is None:
            sys.argv = [script, *args]
            sys.path.insert(0, str(Path(script).resolve().parent))
            runpy.run_path(script, run_name="__main__")
        else:
            sys.argv = [module, *args]
            sys.path.insert(0, str(Path.cwd()))
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return _status(e.code)
    finally:
        sys.argv, sys.path = saved_argv, saved_path
        gc.collect()  # the script's cells die now, not during interpreter teardown (MindSpore's Cell.__del__)
    return 0


def _status(code: object) -> int:
    """The exit status `sys.exit(code)` gives: None is 0, an int itself, anything else printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["-m"]:  # as `python -m MODULE ARGS`: everything after MODULE is the module's
        if len(argv) < 2:
            parser().error("-m needs a MODULE")
        script, module, args = None, argv[1], argv[2:]
    else:
        parsed = parser().parse_args(argv)
        script, module, args = parsed.script, None, parsed.args
    return run(lambda: run_script(script, module, args))


if __name__ == "__main__":
    sys.exit(main())
