"""The alignment moved to `models.data.align`, below both the model code and the workbench (model code
may not import the workbench). This name stays importable, as the same module object, for scripts and
notebooks that still use it."""
import sys

from models.data import align as _align

sys.modules[__name__] = _align
