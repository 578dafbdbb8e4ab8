"""``python -m odekit``: the same CLI as the ``odekit`` script."""

from odekit.cli.app import main

main()
