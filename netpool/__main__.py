"""``python -m netpool`` runs the same CLI as the ``netpool`` command."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="netpool")
