#!/usr/bin/env python3
"""Write the pinned list of SGLang's server flags that the stand-in engine checks.

SGLang 0.5.x derives most flags from annotated dataclass fields of ``ServerArgs``
(``field: A[type, "help" | Arg(...)]``, turned into argparse arguments by
``add_cli_args_from_dataclass`` in python/sglang/srt/arg_groups/arg_utils.py) and adds
the rest by hand in ``ServerArgs.add_cli_args`` (python/sglang/srt/server_args.py).
Importing server_args.py needs torch and CUDA libraries, so this script reads both
statically (ast) and mirrors what those two functions register: every option string,
and how many values it takes.

    scripts/gen-sglang-flags.py                        # pip download sglang==0.5.19
    scripts/gen-sglang-flags.py --source /tmp/sgl/src  # an unpacked wheel or checkout

Output (images/sglang-standin/server_flags.txt), one argparse argument per line:
``<option strings, space separated>\t<arity>[\t<error message>]`` with arity one of
``0`` (a switch), ``1``, ``?``, ``*``, ``+``, ``bool`` (BooleanOptionalAction: the
``--no-`` form is listed too) or ``error`` (a removed flag that makes argparse fail).
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "0.5.19"
SERVER_ARGS = "sglang/srt/server_args.py"
OUT = Path(__file__).resolve().parents[1] / "images" / "sglang-standin" / "server_flags.txt"


def _server_args_source(source: str | None, version: str) -> tuple[str, str]:
    if source:
        path = Path(source)
        for candidate in (path / SERVER_ARGS, path / "python" / SERVER_ARGS, path):
            if candidate.is_file():
                return candidate.read_text(), str(candidate)
        raise SystemExit(f"no {SERVER_ARGS} under {source}")
    tmp = tempfile.mkdtemp(prefix="sglang-wheel-")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "-d",
            tmp,
            f"sglang=={version}",
        ],
        check=True,
    )
    wheel = next(Path(tmp).glob("sglang-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(SERVER_ARGS).decode(), f"{wheel.name}:{SERVER_ARGS}"


def _const(node: ast.AST | None) -> object:
    try:
        return ast.literal_eval(node) if node is not None else None
    except ValueError:
        return None


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):
        return _name(node.value)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return ""


def _kw(call: ast.Call) -> dict[str, ast.AST]:
    return {k.arg: k.value for k in call.keywords if k.arg}


def _unwrap_type(tp: ast.AST) -> ast.AST:
    """Optional[X] / X | None -> X (as _unwrap_optional does)."""
    if isinstance(tp, ast.Subscript) and _name(tp.value) == "Optional":
        return tp.slice
    if isinstance(tp, ast.BinOp) and isinstance(tp.op, ast.BitOr):
        sides = [
            s for s in (tp.left, tp.right) if not (isinstance(s, ast.Constant) and s.value is None)
        ]
        if len(sides) == 1:
            return sides[0]
    if isinstance(tp, ast.Subscript) and _name(tp.value) == "Union":
        elts = tp.slice.elts if isinstance(tp.slice, ast.Tuple) else [tp.slice]
        rest = [e for e in elts if not (isinstance(e, ast.Constant) and e.value is None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _action_arity(action: ast.AST, kw: dict[str, ast.AST], nargs: object) -> tuple[str, str]:
    name = _name(action) if not isinstance(action, ast.Constant) else str(action.value)
    if name == "BooleanOptionalAction":
        return "bool", ""
    if name == "DeprecatedAction":
        message = _const(kw.get("error_message"))
        if message:
            return "error", str(message)
        return str(nargs if nargs is not None else 0), ""
    if name in {"store_true", "store_false", "store_const", "count", "help", "version"}:
        return "0", ""
    if name in {"DeprecatedStoreTrueAction", "DeprecatedStoreConstAction"}:
        return str(nargs if nargs is not None else 0), ""
    return str(nargs if nargs is not None else 1), ""


def dataclass_flags(cls: ast.ClassDef) -> list[tuple[list[str], str, str]]:
    """What add_cli_args_from_dataclass registers for each annotated field."""
    out = []
    for stmt in cls.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        ann = stmt.annotation
        if not (isinstance(ann, ast.Subscript) and _name(ann.value) in {"A", "Annotated"}):
            continue
        elts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
        raw_type, meta = elts[0], elts[1:]
        arg: ast.Call | None = None
        has_help = False
        for m in meta:  # the first Arg(...) or string wins, as in _unwrap_annotated
            if isinstance(m, ast.Call) and _name(m.func) == "Arg":
                arg = m
                break
            if isinstance(m, (ast.Constant, ast.JoinedStr, ast.BinOp)) and (
                not isinstance(m, ast.Constant) or isinstance(m.value, str)
            ):
                has_help = True
                break
        if arg is None and not has_help:
            continue  # no CLI metadata: registered by hand, if at all
        kw = _kw(arg) if arg is not None else {}
        if _const(kw.get("no_cli")) is True:
            continue
        field = stmt.target.id
        cli_name = _const(kw.get("cli_name")) or "--" + field.replace("_", "-")
        aliases = _const(kw.get("aliases"))
        names = (
            [str(cli_name), *(str(a) for a in aliases)]
            if isinstance(aliases, list)
            else [str(cli_name)]
        )
        nargs = _const(kw.get("nargs"))
        if "action" in kw:
            arity, message = _action_arity(kw["action"], _kw_dict(kw.get("action_kwargs")), nargs)
            if arity == "bool":
                names += ["--no-" + n[2:] for n in names if n.startswith("--")]
            out.append((names, arity, message))
            continue
        inner = _unwrap_type(raw_type)
        if _name(inner) == "Literal":
            arity = "1"
        elif _name(inner) in {"List", "list"} and "type_parser" not in kw:
            arity = str(nargs or "+")
        elif isinstance(inner, ast.Name) and inner.id == "bool":
            arity = "0"
        else:
            arity = str(nargs or 1)
        out.append((names, arity, ""))
    return out


def _kw_dict(node: ast.AST | None) -> dict[str, ast.AST]:
    if isinstance(node, ast.Dict):
        pairs = zip(node.keys, node.values, strict=True)
        return {str(_const(k)): v for k, v in pairs if k is not None}
    return {}


def manual_flags(func: ast.FunctionDef) -> list[tuple[list[str], str, str]]:
    """parser.add_argument("--x", ...) calls in ServerArgs.add_cli_args."""
    out = []
    for node in ast.walk(func):
        if not (isinstance(node, ast.Call) and _name(node.func) == "add_argument"):
            continue
        names = [
            a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
        ]
        if not names:
            continue
        kw = _kw(node)
        nargs = _const(kw.get("nargs"))
        if "action" in kw:
            arity, message = _action_arity(kw["action"], kw, nargs)
            if arity == "bool":
                names += ["--no-" + n[2:] for n in names if n.startswith("--")]
        else:
            arity, message = str(nargs if nargs is not None else 1), ""
        out.append((names, arity, message))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", help="an unpacked sglang wheel or checkout (else pip download)")
    p.add_argument("--version", default=VERSION)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    text, origin = _server_args_source(args.source, args.version)
    tree = ast.parse(text)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ServerArgs")
    add_cli = next(
        n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "add_cli_args"
    )
    flags = dataclass_flags(cls) + manual_flags(add_cli)
    seen: set[str] = set()
    lines = []
    for names, arity, message in flags:
        dup = seen.intersection(names)
        if dup:
            raise SystemExit(f"flag registered twice: {sorted(dup)} (argparse would refuse too)")
        seen.update(names)
        lines.append(
            "\t".join([" ".join(names), arity, *([message.replace("\n", " ")] if message else [])])
        )
    header = (
        f"# SGLang {args.version} server flags (python/sglang/srt/server_args.py),\n"
        "# generated by scripts/gen-sglang-flags.py.\n"
        "# Do not edit: regenerate. Format: option strings<TAB>arity[<TAB>error message].\n"
    )
    args.out.write_text(header + "\n".join(lines) + "\n")
    print(
        f"wrote {len(lines)} arguments ({len(seen)} option strings) from {origin} to {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
