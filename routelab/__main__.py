"""``python -m routelab``: the command line, as the ``routelab`` command runs it."""

from routelab.cli import run

if __name__ == "__main__":
    run()
