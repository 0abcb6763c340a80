"""An agent's loop on pf: warm a Python REPL up once (it builds a big table, as a model or a
language server loads for minutes), freeze it, then explore branches from that warm state —
each branch a fresh copy that answers from the table without building it again.

    pip install ./python && sudo python3 python/examples/agent.py   (root and CRIU needed)
"""

import sys
import tempfile
import time

import pf

REPL = [
    sys.executable,
    "-u",
    "-c",
    "import sys\n"
    "table = {i: i * i for i in range(2_000_000)}\n"
    "print('ready', flush=True)\n"
    "for line in sys.stdin:\n"
    "    print(eval(line, {'table': table}), flush=True)\n",
]


def main(store: pf.Store) -> None:
    started = time.monotonic()
    warmed = pf.goblins.warm_up(REPL, store, ready=r"^ready$", timeout=120, tag="repl")
    print(f"warmed up in {warmed.warmup:.2f} s, frozen as {warmed.snapshot}")

    questions = [b"table[12]\n", b"sum(table[i] for i in range(10))\n", b"len(table)\n"]
    t = time.monotonic()
    for branch in pf.goblins.fork_and_collect("repl", questions, store, deadline=30):
        answer = branch.stdout.decode().strip()
        print(f"branch {branch.clone}: {answer} (exit {branch.returncode})")
    print(f"{len(questions)} branches in {time.monotonic() - t:.2f} s; all told {time.monotonic() - started:.2f} s")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="pf-agent-") as tmp:
        main(pf.Store(tmp + "/store"))
