"""fstx: make a batch of filesystem changes all-or-nothing.

Plan copies, renames, deletes and writes inside a root directory, then commit
them as one step that survives crashes and waits out files in use::

    with fstx.transaction(venv) as tx:
        tx.copy(build / "pkg", "lib/site-packages/pkg")
        tx.delete("lib/site-packages/pkg-1.0.dist-info")
"""

from __future__ import annotations

from fstx._atomic import atomic_dir, atomic_open, atomic_write, sweep
from fstx._errors import (
    CommitError,
    FstxError,
    InUseError,
    JournalError,
    LockTimeout,
    PlanError,
    RollbackError,
)
from fstx._recovery import RecoveryReport, Status, recover, status
from fstx._retry import RetryPolicy, is_transient
from fstx._transaction import CommitReport, Operation, Transaction, transaction

__version__ = "0.1.0"

__all__ = [
    "CommitError",
    "CommitReport",
    "FstxError",
    "InUseError",
    "JournalError",
    "LockTimeout",
    "Operation",
    "PlanError",
    "RecoveryReport",
    "RetryPolicy",
    "RollbackError",
    "Status",
    "Transaction",
    "__version__",
    "atomic_dir",
    "atomic_open",
    "atomic_write",
    "is_transient",
    "recover",
    "status",
    "sweep",
    "transaction",
]
