"""python -m interpreter MODULE FUNCTION: run interpreter.MODULE.FUNCTION() (under TRITON_INTERPRET=1, set by
the caller before triton is imported) and print "ok" if it returns."""
import importlib
import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1: these checks run the kernels in Triton's CPU interpreter")
module, function = sys.argv[1:3]
getattr(importlib.import_module(f"interpreter.{module}"), function)()
print("ok")
