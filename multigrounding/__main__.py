"""``python -m multigrounding`` runs the same CLI as the ``multigrounding`` command."""
from multigrounding.cli import main

if __name__ == "__main__":
    main()
