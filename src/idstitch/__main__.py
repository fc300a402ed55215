"""`python -m idstitch`: the command line."""

from idstitch.cli import main

if __name__ == "__main__":
    main()
