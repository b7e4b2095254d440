"""The differential tester and the qcow2lab command line."""
