"""An example pytest suite using the qemusnap plugin (a package, so that its conftest does not
shadow another suite's ``conftest`` module when both are run together)."""
