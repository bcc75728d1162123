"""``python -m eventsource``: the same as the ``eventsource`` command."""

from eventsource.cli import main

if __name__ == "__main__":
    main()
