"""`python -m tests.failover --trials N`: every fault, N trials, one report."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from tests.failover import report, runner
from tests.failover.load import Load
from tests.failover.runner import ScenarioResult, run_scenario
from tests.failover.scenarios import FAULTS
from tests.support.provenance import commit
from tests.support.stack import Stack, running_stack


async def run_all(
    stack: Stack, faults: list[str], trials: int, concurrency: int, tools: bool = False
) -> list[ScenarioResult]:
    load = Load(stack.gateway_url, concurrency=concurrency, tools=tools)
    await load.take_references()
    results = []
    try:
        for trial in range(1, trials + 1):
            for name in faults:
                result = await run_scenario(stack, FAULTS[name], trial, load)
                ok = [r for r in result.records if r["ok"]]
                print(
                    f"[{stack.mode} {name} #{trial} on {result.primary_before}]"
                    f" detected {result.detected} promoted {result.promoted}"
                    f" recovered {result.recovered} failed {result.nonstream_failed}/"
                    f"{result.stream_failed} migrated {result.migrations}"
                    f" text mismatches {result.text_mismatches}"
                    f" usage mismatches {sum(1 for r in ok if r['usage_matches'] is False)}"
                    f" reasoning answers {sum(1 for r in ok if r['reasoning'])}"
                    f" tool-call answers {sum(1 for r in ok if r['tool_calls'])}"
                    f" refused {result.stream_refused} (tool streams open at the fault:"
                    f" moved {result.tool_streams_moved}, refused {result.tool_streams_refused})"
                    f" rejoined {result.rejoined_as_standby}",
                    flush=True,
                )
                results.append(result)
    finally:
        await load.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.failover", description=__doc__)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated subset")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("reports/failover"))
    parser.add_argument(
        "--mode",
        choices=["pair", "pool"],
        default="pair",
        help="HA_MODE of the stack under test (make up MODE=...)",
    )
    parser.add_argument(
        "--nodes", type=int, default=2, help="nodes in the stack (make up NODES=...), 2 to 9"
    )
    parser.add_argument(
        "--stack-files",
        default="compose.yaml,compose.test.yaml",
        help="compose files of the stack under test (compose/), e.g. the GPU stack for gpu-smoke",
    )
    parser.add_argument(
        "--reasoning-parser",
        choices=["qwen3", "deepseek-r1"],
        help="run the simulator nodes with this --reasoning-parser and tell the relay"
        " (adds compose/reasoning.test.yaml)",
    )
    parser.add_argument(
        "--tool-call-parser",
        choices=["qwen25", "qwen"],
        help="run the simulator nodes with this --tool-call-parser and send tools with every"
        " other prompt (adds compose/tool-calls.test.yaml)",
    )
    parser.add_argument(
        "--rejoin-timeout",
        type=float,
        default=runner.REJOIN_TIMEOUT,
        help="how long a healed node may take to rejoin, s (real SGLang reloads its weights)",
    )
    args = parser.parse_args(argv)
    if not 2 <= args.nodes <= 9:
        parser.error("--nodes: 2 to 9")
    runner.REJOIN_TIMEOUT = args.rejoin_timeout
    faults = [f for f in args.faults.split(",") if f]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        parser.error(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    files = [f for f in args.stack_files.split(",") if f]
    env = {}
    if args.reasoning_parser:
        files.append("reasoning.test.yaml")
        env["SGLANG_HA_REASONING_PARSER"] = args.reasoning_parser
    if args.tool_call_parser:
        files.append("tool-calls.test.yaml")
        env["SGLANG_HA_TOOL_CALL_PARSER"] = args.tool_call_parser
    described = {"mode": args.mode, "nodes": args.nodes, "commit": commit()}
    with running_stack(tuple(files), env=env, mode=args.mode, nodes=args.nodes) as stack:
        try:
            results = asyncio.run(
                run_all(stack, faults, args.trials, args.concurrency, bool(args.tool_call_parser))
            )
        finally:
            # Keep the components' own logs beside the report, for post-mortems.
            args.out.mkdir(parents=True, exist_ok=True)
            for service in ("gateway", *stack.services.values()):
                (args.out / f"log-{service}.txt").write_text(stack.logs(service))
            bugs = stack.bug_lines()
    report.write(results, args.out, described)
    if bugs:
        print("components logged BUG lines:\n" + "\n".join(bugs[:20]), file=sys.stderr)
    print((args.out / "failover-report.md").read_text())
    failed = [r for r in results if r.nonstream_failed or r.stream_failed]
    return 1 if failed or bugs else 0


if __name__ == "__main__":
    sys.exit(main())
