"""Recovery is declared by each operation's room and dispatched by the journal's operation name
(docs/architecture.md): every operation the journal format knows has exactly one recovery, and
an entry nobody declares is refused rather than dropped."""

from __future__ import annotations

import pytest

from qemusnap.engine import (
    clone,
    create_external,
    create_internal,
    delete,
    rebuild,
    revert,
    save_restore,
)
from qemusnap.engine.journal import declared_operations, recovers, recovery_for
from qemusnap.errors import OperationError

#: The operation names journals written before the split hold (they must still recover).
JOURNAL_OPERATIONS = {
    "create-internal": create_internal.recover_create_internal,
    "create-external": create_external.recover_create_external,
    "revert": revert.recover_revert,
    "delete-internal": delete.recover_delete_internal,
    "delete-external": delete.recover_delete_external,
    "save": save_restore.recover_save,
    "restore": save_restore.recover_restore,
    "clone": clone._recover,
    "rebuild": rebuild.recover_rebuild,
}


def test_every_journal_operation_has_its_rooms_recovery() -> None:
    # New rooms add their own operations (e.g. "clone"); these must stay.
    assert set(JOURNAL_OPERATIONS) <= set(declared_operations())
    for operation, recovery in JOURNAL_OPERATIONS.items():
        assert recovery_for(operation) is recovery


def test_an_undeclared_operation_is_refused() -> None:
    with pytest.raises(OperationError, match="'frobnicate'"):
        recovery_for("frobnicate")


def test_a_second_recovery_for_one_operation_is_refused() -> None:
    with pytest.raises(RuntimeError, match="two recoveries"):
        recovers("revert")(revert.recover_revert)
    assert recovery_for("revert") is revert.recover_revert
