"""The stand-in's flag check (images/sglang-standin) and the script that pins SGLang's
server flags (scripts/gen-sglang-flags.py), without Docker.

The generator mirrors ``add_cli_args_from_dataclass`` (python/sglang/srt/arg_groups/
arg_utils.py) and ``ServerArgs.add_cli_args`` (python/sglang/srt/server_args.py).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "images" / "sglang-standin"
FLAGS = STANDIN / "server_flags.txt"
SGLANG_SRC = Path("/tmp/sgl/src")  # the pinned wheel, unpacked (development machines)


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(*argv: str) -> subprocess.CompletedProcess[str]:
    """`python3 -m sglang.launch_server` of the stand-in, stopped before it serves."""
    code = (
        "import sys, sglang.launch_server as ls;"
        "a = ls.build_parser().parse_args(sys.argv[1:]);"
        "print(a.model_path, a.tp_size, a.api_key)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": str(STANDIN)},
    )


def test_the_launchers_flags_and_common_gpu_flags_pass() -> None:
    # What images/node/engine-launch.sh always passes, and flags the README suggests.
    out = _launch(
        "--model-path", "Qwen/Qwen2.5-0.5B-Instruct", "--tp-size", "2",
        "--host", "0.0.0.0", "--port", "30000", "--enable-metrics", "--api-key", "k",
        "--mem-fraction-static", "0.4", "--served-model-name", "m", "--tensor-parallel-size", "2",
        "--no-lora-strict-loading", "--cuda-graph-bs", "1", "2", "4",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Qwen/Qwen2.5-0.5B-Instruct", "2", "k"]


def test_the_launchers_tls_flags_reach_the_simulator() -> None:
    """What engine-launch.sh adds when the engine serves TLS (multi-host stacks)."""
    code = (
        "import os, sys, sglang.launch_server as ls;"
        "ls._touch_cache = lambda model: None;"
        "os.execve = lambda path, cmd, env: print(' '.join(cmd[1:]));"
        "ls.main(sys.argv[1:])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "--model-path", "m", "--port", "30000",
         "--ssl-certfile", "/run/secrets/engine_tls.crt",
         "--ssl-keyfile", "/run/secrets/engine_tls.key",
         "--enable-ssl-refresh", "--ssl-ca-certs", "/run/secrets/tls_ca.crt"],
        capture_output=True, text=True, timeout=30, env={"PYTHONPATH": str(STANDIN)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-7:] == [
        "--ssl-certfile", "/run/secrets/engine_tls.crt",
        "--ssl-keyfile", "/run/secrets/engine_tls.key",
        "--ssl-ca-certs", "/run/secrets/tls_ca.crt",
        "--enable-ssl-refresh",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--model-path", "m", "--enable-dp-attentionn"],
            "unrecognized arguments: --enable-dp-attentionn",
        ),
        (["--tp-size", "2"], "the following arguments are required: --model-path"),
        (["--model-path", "m", "--port"], "argument --port: expected one argument"),
        (["--model-path", "m", "--enable-expert-distribution-metrics"], "no longer supported"),
    ],
)
def test_bad_argv_fails_as_sglangs_argparse(argv: list[str], message: str) -> None:
    out = _launch(*argv)
    assert out.returncode == 2
    assert "sglang serve: error:" in out.stderr and message in out.stderr


SYNTHETIC = """
import argparse
from typing import List, Literal, Optional
from sglang.srt.arg_groups.arg_utils import A, Arg, NS

@dataclasses.dataclass
class ServerArgs:
    model_path: A[str, Arg(help="weights", aliases=["--model"]), NS("model")]
    tp_size: A[int, Arg(help="tp", aliases=["--tensor-parallel-size"])] = 1
    host: A[str, "The host."] = "127.0.0.1"
    enable_metrics: A[bool, "metrics", NS("obs")] = False
    maybe_flag: A[Optional[bool], "optional bool"] = None
    dtype: A[Literal["auto", "half"], "dtype"] = "auto"
    cuda_graph_bs: A[Optional[List[int]], "sizes"] = None
    injected: A[int, Arg(help="python only", no_cli=True)] = 0
    renamed: A[str, Arg(help="x", cli_name="--other-name")] = ""
    strict: A[bool, Arg(help="x", action=argparse.BooleanOptionalAction)] = True
    plain: int = 3

    @staticmethod
    def add_cli_args(parser):
        add_cli_args_from_dataclass(parser, ServerArgs)
        parser.add_argument("--config", type=str)
        parser.add_argument("--old", action=DeprecatedAction, error_message="gone, use --new")
        parser.add_argument("--old-list", nargs="+", action=DeprecatedAliasStoreAction)
        parser.add_argument("--old-switch", action=DeprecatedStoreTrueAction)
"""


def test_generator_mirrors_add_cli_args(tmp_path: Path) -> None:
    src = tmp_path / "server_args.py"
    src.write_text(SYNTHETIC)
    out = tmp_path / "flags.txt"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-sglang-flags.py"), "--source", str(src),
         "--out", str(out)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = [line for line in out.read_text().splitlines() if not line.startswith("#")]
    assert lines == [
        "--model-path --model\t1",
        "--tp-size --tensor-parallel-size\t1",
        "--host\t1",
        "--enable-metrics\t0",
        "--maybe-flag\t0",
        "--dtype\t1",
        "--cuda-graph-bs\t+",
        "--other-name\t1",
        "--strict --no-strict\tbool",
        "--config\t1",
        "--old\terror\tgone, use --new",
        "--old-list\t+",
        "--old-switch\t0",
    ]


@pytest.mark.skipif(not SGLANG_SRC.exists(), reason="SGLang 0.5.19 source not unpacked here")
def test_pinned_flag_list_is_what_the_generator_makes_of_sglang_0_5_19(tmp_path: Path) -> None:
    out = tmp_path / "flags.txt"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-sglang-flags.py"), "--source", str(SGLANG_SRC),
         "--out", str(out)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    assert out.read_text() == FLAGS.read_text()


@pytest.mark.parametrize("key", ["-LCkey_from_token_urlsafe", "kplain"])
def test_the_launcher_passes_a_key_that_begins_with_a_dash(tmp_path: Path, key: str) -> None:
    """images/node/engine-launch.sh into the stand-in's argparse (SGLang's flags): a
    generated key may begin with "-" (1 in 64 of token_urlsafe's), which argparse takes
    for a flag when it is a separate word; the engine then exited 2 at every start."""
    (tmp_path / "api_key").write_text(key)
    (tmp_path / "admin_key").write_text("-" + key)
    echo = tmp_path / "echo-argv"  # stands for the simulator the stand-in execs
    echo.write_text('#!/bin/sh\nprintf "%s\\n" "$SIM_API_KEY" "$SIM_ADMIN_API_KEY" "$@"\n')
    echo.chmod(0o755)
    out = subprocess.run(
        ["sh", str(ROOT / "images" / "node" / "engine-launch.sh")],
        capture_output=True,
        text=True,
        timeout=30,
        env={
            "PATH": "/usr/bin:/bin",
            "ENGINE": "sglang",
            "ENGINE_PYTHON": sys.executable,
            "PYTHONPATH": str(STANDIN),
            "SGLANG_STANDIN_SIM": str(echo),
            "MODEL_PATH": str(tmp_path),  # a local folder: no cache to write
            "ENGINE_PORT": "30000",
            "HA_ENGINE_API_KEY_FILE": str(tmp_path / "api_key"),
            "HA_ENGINE_ADMIN_API_KEY_FILE": str(tmp_path / "admin_key"),
        },
    )
    assert out.returncode == 0, out.stderr
    assert "api_key=set" in out.stderr
    # The simulator gets both keys whole (as SGLang's argparse would have them).
    assert out.stdout.split("\n")[:4] == [key, "-" + key, "--host", "0.0.0.0"], out.stdout
