"""Checks of the Triton kernels in Triton's CPU interpreter, one function each, run in a subprocess under
TRITON_INTERPRET=1 by the `triton_interpreter` fixture (conftest.py): `python -m interpreter MODULE FUNCTION`."""
