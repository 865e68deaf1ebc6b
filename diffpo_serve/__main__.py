"""``python -m diffpo_serve``: the same as the ``diffpo-serve`` command."""

from diffpo_serve.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
