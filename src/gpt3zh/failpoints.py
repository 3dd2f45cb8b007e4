"""Named crash points, for crash-safety tests of real processes.

`GPT3ZH_FAILPOINT=NAME[@K]` makes the process SIGKILL itself the K-th time (default: the first) it
reaches `failpoint(NAME)`: no cleanup handler runs, exactly as when a machine loses power or the OOM
killer strikes. Unset (always, outside such tests) a failpoint is one cached lookup. The names in
use: train.step (an optimizer step is done), checkpoint.write (a checkpoint's files are written, not
yet renamed into place), checkpoint.prune (an old checkpoint is moved aside, not yet deleted),
output.write (an export's files are written, not yet renamed), output.replace (the previous
export is moved aside, the new one not yet in place).
"""

from __future__ import annotations

import functools
import os
import signal

ENV = "GPT3ZH_FAILPOINT"
_hits: dict[str, int] = {}


@functools.cache
def _armed() -> tuple[str, int] | None:
    spec = os.environ.get(ENV)  # read once, here only
    if not spec:
        return None
    name, _, k = spec.partition("@")
    return name, int(k or 1)


def failpoint(name: str) -> None:
    armed = _armed()
    if armed is None or armed[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == armed[1]:
        os.kill(os.getpid(), signal.SIGKILL)
