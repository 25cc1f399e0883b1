"""CPU time of process trees (a server and its backends, say), read from Linux's /proc."""

import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

Stats = dict[int, tuple[int, int]]  # pid -> (parent pid, user + system CPU ticks)


def proc_stats() -> Stats:
    found: Stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited meanwhile
            continue
        fields = text[text.rindex(")") + 2:].split()  # from field 3, the state, on
        found[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return found


def tree_cpu_seconds(stats: Stats, roots: Iterable[int]) -> float:
    """CPU seconds of the roots and their live descendants."""
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _) in stats.items():
        children[ppid].append(pid)
    ticks, todo = 0, list(roots)
    while todo:
        pid = todo.pop()
        ticks += stats.get(pid, (0, 0))[1]
        todo.extend(children.get(pid, ()))
    return ticks / os.sysconf("SC_CLK_TCK")
