"""Thin, careful access to rego-cpp through regopy's shared library.

Invariants:

* Never read the text or node of an output that is not ok: rego-cpp 1.5.2 crashes the
  process (SIGSEGV) when an error output is rendered. Errors are read from the interpreter.
* An output that is "ok" may still carry an error term instead of JSON (seen with constant
  object rules in compiled bundles); callers must treat unparsable text as an engine error.
* Input documents are built with direct calls that keep the GIL (``ctypes.PyDLL``): regopy's
  ``Input`` releases and retakes the GIL on every node, which dominated the cost of a
  decision. ``regoSetInput`` clones the value, so the input handle is freed at once.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

# Load order matters. librego_shared.so (regopy) carries snmalloc and exports its own global
# operator new/delete, but not libstdc++: the rest of the C++ runtime (std::string growth,
# streams, ...) lives in libstdc++.so, which binds operator new to whichever definition its
# loader saw first. Left alone, the two allocators meet on the same blocks:
#   * libstdc++ loaded first (numpy and hnswlib load it): blocks malloc'd inside libstdc++
#     are freed through snmalloc, which ignores pointers it does not own. Every decision
#     leaked ~150 KB; the server grew ~1-2 KB per answered call (tests/policy/test_memory.py).
#   * regopy loaded first: libstdc++ binds to snmalloc, hnswlib frees with glibc, and the
#     first knn_query result aborts the process (tests/policy/test_load_order.py).
# Putting libstdc++ in the global scope before regopy loads makes every lookup of operator
# new/delete, regopy's own included, find libstdc++'s (glibc) pair first: one allocator for
# the whole process, in either import order. A library already loaded is promoted. Import
# regopy through this module only (``Interpreter`` and ``Bundle`` below).
if "regopy" in sys.modules:
    raise ImportError(
        "regopy was imported before centinela.policy.rego_native; "
        "import the policy engine through centinela.policy"
    )
ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_GLOBAL)

import regopy  # noqa: E402  (after the libstdc++ promotion above, always)
from regopy import rego_shared as _rs  # noqa: E402

Interpreter = regopy.Interpreter
Bundle = regopy.Bundle
Input = regopy.Input  # the slow, GIL-releasing input builder (a benchmark baseline)

_OK = 0
_lib = ctypes.PyDLL(_rs.path)
_vp = ctypes.c_void_p

_lib.regoNewInput.restype = _vp
_lib.regoNewInput.argtypes = []
_lib.regoFreeInput.restype = None
_lib.regoFreeInput.argtypes = [_vp]
for _name, _arg in (
    ("regoInputInt", ctypes.c_int64),
    ("regoInputFloat", ctypes.c_double),
    ("regoInputString", ctypes.c_char_p),
    ("regoInputBoolean", ctypes.c_bool),
):
    getattr(_lib, _name).restype = ctypes.c_uint32
    getattr(_lib, _name).argtypes = [_vp, _arg]
for _name in ("regoInputObject", "regoInputArray"):
    getattr(_lib, _name).restype = ctypes.c_uint32
    getattr(_lib, _name).argtypes = [_vp, ctypes.c_uint32]
for _name in ("regoInputNull", "regoInputObjectItem"):
    getattr(_lib, _name).restype = ctypes.c_uint32
    getattr(_lib, _name).argtypes = [_vp]

_S = _lib.regoInputString
_I = _lib.regoInputInt
_F = _lib.regoInputFloat
_B = _lib.regoInputBoolean
_N = _lib.regoInputNull
_OI = _lib.regoInputObjectItem
_O = _lib.regoInputObject
_A = _lib.regoInputArray

_INT64 = 2**63


class RegoFailure(Exception):
    """rego-cpp reported an error (message from the interpreter, never input values)."""


def _push(p: int, v: Any) -> None:
    t = type(v)
    if t is str:
        rc = _S(p, v.encode("utf-8"))
    elif t is bool:
        rc = _B(p, v)
    elif t is int:
        if not -_INT64 <= v < _INT64:
            raise ValueError("integer out of range")
        rc = _I(p, v)
    elif t is float:
        rc = _F(p, v)
    elif v is None:
        rc = _N(p)
    elif isinstance(v, Mapping):
        for k, x in v.items():
            if not isinstance(k, str):
                raise ValueError("object keys must be strings")
            if _S(p, k.encode("utf-8")) != _OK:
                raise ValueError("input rejected")
            _push(p, x)
            if _OI(p) != _OK:
                raise ValueError("input rejected")
        rc = _O(p, len(v))
    elif isinstance(v, Sequence) and not isinstance(v, bytes | bytearray):
        for x in v:
            _push(p, x)
        rc = _A(p, len(v))
    elif isinstance(v, int):  # int subclasses other than bool
        rc = _I(p, int(v))
    elif isinstance(v, float):
        rc = _F(p, float(v))
    else:
        raise ValueError(f"cannot pass a {t.__name__} to the policy")
    if rc != _OK:
        raise ValueError("input rejected")


def set_input(interpreter: regopy.Interpreter, value: Any) -> None:
    """Set the interpreter's input document to ``value`` (JSON-like Python data).

    Raises:
        ValueError: the value cannot be represented (non-string key, unsupported type).
        RegoFailure: rego-cpp refused the input.
    """
    p = _lib.regoNewInput()
    if not p:
        raise RegoFailure("cannot allocate input")
    try:
        _push(p, value)
        try:
            _rs.rego_set_input(interpreter._impl, p)
        except _rs.RegoError as exc:
            raise RegoFailure(str(exc)) from exc
    finally:
        _lib.regoFreeInput(p)


def query_entrypoint(
    interpreter: regopy.Interpreter, bundle: regopy.Bundle, entrypoint: str
) -> Any:
    """Evaluate a compiled entry point; return its value, or ``None`` if undefined.

    Raises:
        RegoFailure: rego-cpp reported an error or returned text that is not JSON.
    """
    try:
        out = _rs.rego_bundle_query_entrypoint(interpreter._impl, bundle._impl, entrypoint)
    except _rs.RegoError as exc:
        raise RegoFailure(str(exc)) from exc
    try:
        if not _rs.rego_output_ok(out):
            raise RegoFailure(_rs.rego_get_error(interpreter._impl))
        text = _rs.rego_output_string(out)
    finally:
        _rs.rego_free_output(out)
    return parse_output(text)


def query(interpreter: regopy.Interpreter, text: str) -> Any:
    """Run an ad-hoc query ``x := <ref>``-style; return the first expression or ``None``."""
    try:
        out = _rs.rego_query(interpreter._impl, text)
    except _rs.RegoError as exc:
        raise RegoFailure(str(exc)) from exc
    try:
        if not _rs.rego_output_ok(out):
            raise RegoFailure(_rs.rego_get_error(interpreter._impl))
        raw = _rs.rego_output_string(out)
    finally:
        _rs.rego_free_output(out)
    return parse_output(raw)


def parse_output(text: str) -> Any:
    """The value of the first expression of an output text, ``None`` when undefined."""
    if text == "undefined":
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegoFailure("engine returned an error term") from exc
    if isinstance(doc, list):
        doc = doc[0] if doc else {}
    if not isinstance(doc, dict):
        raise RegoFailure("unexpected output shape")
    exprs = doc.get("expressions")
    if not isinstance(exprs, list) or not exprs:
        return None
    return exprs[0]


def compile_bundle(
    modules: Mapping[str, str], data: Sequence[Mapping[str, Any]], entrypoints: Sequence[str]
) -> tuple[regopy.Interpreter, regopy.Bundle]:
    """Compile modules and data documents into a bundle with the given entry points.

    Raises:
        RegoFailure: a module does not parse or the bundle does not build.
    """
    interp = regopy.Interpreter()
    try:
        for name, src in modules.items():
            interp.add_module(name, src)
        for doc in data:
            interp.add_data_json(json.dumps(doc))
        compiled = interp.build(None, list(entrypoints))
    except _rs.RegoError as exc:
        raise RegoFailure(str(exc)) from exc
    if not compiled.ok():
        raise RegoFailure(_rs.rego_get_error(interp._impl) or "bundle did not build")
    return interp, compiled
