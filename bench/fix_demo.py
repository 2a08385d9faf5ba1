"""The demo's tick-to-order through the native gateway (broker simulator) and through FIX 4.4
(the real QuickFIX `executor`), alternated in one invocation on the same seeded day.

Run it inside a private network namespace (the QuickFIX examples bind every interface):

    unshare -n sh -c 'ip link set lo up && exec python -m bench.fix_demo [--runs 3] [--minutes 120]'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fix_scenarios import free_port, peer  # noqa: E402


async def demo(args: argparse.Namespace, broker: list[str]) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "demo", "--json", "--minutes", str(args.minutes), *broker,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await proc.communicate()
    summary: dict[str, Any] = json.loads(out)
    return summary


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--minutes", type=int, default=120)
    args = parser.parse_args()
    port = free_port()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        async with peer("executor", port, Path(tmp)):
            for i in range(args.runs):
                for name, broker in (
                    ("native (simulator)", []),
                    ("FIX 4.4 (QuickFIX executor)", ["--broker", "fix44", "--broker-port", str(port)]),
                ):
                    s = await demo(args, broker)
                    lat, orders = s["latency_us"], s["orders"]
                    rows.append(
                        f"| {i} | {name} | {orders['sent']} | {orders['filled']} | {lat['tick_to_order']['p50']} | "
                        f"{lat['tick_to_order']['p99']} | {lat['send']['p50']} | {lat['send']['p99']} |"
                    )
                    print(rows[-1], file=sys.stderr, flush=True)
    print("| run | gateway | orders sent | filled | t2o p50 µs | t2o p99 µs | send stage p50 µs | p99 µs |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
